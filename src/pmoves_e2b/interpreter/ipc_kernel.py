"""Start an ipykernel kernel whose every socket is a Unix socket, none TCP.

``python -m pmoves_e2b.interpreter.ipc_kernel --pipe PATH (-m MODULE | SCRIPT) ARGS...`` runs the
kernelspec's own launcher (``-m ipykernel_launcher`` or bash's script) as python would, after one
change: the pipe through which forked children (multiprocessing) send their output to the kernel's
IOPub thread is bound at ``ipc://PATH``. ipykernel binds it to a random TCP port on 127.0.0.1 even
when its channels use the ipc transport, and libzmq waits on its sockets with epoll: gVisor's
checkpoint (the gvisor tier's pause and snapshots) cannot save a TCP socket in an epoll set, so one
such pipe keeps a code interpreter sandbox from ever being saved. An ipykernel without those two
methods (a later version) keeps its TCP pipe: its sandbox then pauses in memory, as before.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any


def _use_ipc_pipe(path: str) -> None:
    import zmq
    from ipykernel.iostream import IOPubThread
    from zmq.eventloop.zmqstream import ZMQStream

    if not (hasattr(IOPubThread, "_setup_pipe_in") and hasattr(IOPubThread, "_setup_pipe_out")):
        return
    address = f"ipc://{path}"

    def setup_pipe_in(self: Any) -> None:
        self._pipe_uuid = os.urandom(16)  # authenticates the children's messages, as ipykernel's
        pipe_in = self.socket.context.socket(zmq.PULL)
        pipe_in.linger = 0
        try:
            pipe_in.bind(address)
        except zmq.ZMQError:
            self._pipe_flag = False  # as ipykernel's: the children's output is then lost, not the kernel
            pipe_in.close()
            return
        self._pipe_in = ZMQStream(pipe_in, self.io_loop)
        self._pipe_in.on_recv(self._handle_pipe_msg)

    def setup_pipe_out(self: Any) -> tuple[Any, Any]:
        context = zmq.Context()  # a forked child's own, as ipykernel's
        pipe_out = context.socket(zmq.PUSH)
        pipe_out.linger = 3000
        pipe_out.connect(address)
        return context, pipe_out

    IOPubThread._setup_pipe_in = setup_pipe_in  # type: ignore[method-assign]
    IOPubThread._setup_pipe_out = setup_pipe_out  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--pipe":
        raise SystemExit("usage: python -m pmoves_e2b.interpreter.ipc_kernel --pipe PATH (-m MODULE | SCRIPT) ARGS...")
    _use_ipc_pipe(argv[1])
    target = argv[2:]
    if target[0] == "-m" and len(target) > 1:
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = target
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
