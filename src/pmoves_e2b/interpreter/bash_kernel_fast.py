"""bash_kernel without pexpect's 50 ms pause before every send.

As shipped, bash_kernel takes about 3 s to start and 110 ms per cell: pexpect sleeps
``delaybeforesend`` (0.05 s) before each of the ~45 lines of its init script and every command.
Kernelspec argv: ``python -m pmoves_e2b.interpreter.bash_kernel_fast -f {connection_file}``.
"""

from __future__ import annotations

from typing import Any


def main() -> None:
    import pexpect.spawnbase

    original_init = pexpect.spawnbase.SpawnBase.__init__

    def init_without_send_delay(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.delaybeforesend = None

    pexpect.spawnbase.SpawnBase.__init__ = init_without_send_delay

    from bash_kernel.kernel import BashKernel
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(kernel_class=BashKernel)


if __name__ == "__main__":
    main()
