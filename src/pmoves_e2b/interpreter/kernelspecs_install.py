"""Write the kernelspecs this server expects for Python and Bash into a prefix.

``python -m pmoves_e2b.interpreter.kernelspecs_install --prefix /opt/venv`` writes
``<prefix>/share/jupyter/kernels/python3`` (ipykernel) and ``.../bash`` (bash_kernel with
the fast launcher), both run by this Python. Other kernels (Deno, IRkernel) come with their own
installers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def kernel_specs(python: str) -> dict[str, dict[str, object]]:
    return {
        "python3": {
            "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
            "interrupt_mode": "signal",
            "metadata": {"debugger": True},
        },
        "bash": {
            "argv": [python, "-m", "pmoves_e2b.interpreter.bash_kernel_fast", "-f", "{connection_file}"],
            "display_name": "Bash",
            "language": "bash",
            "interrupt_mode": "signal",
            "env": {"PS1": "$"},
        },
    }


def install(prefix: Path, python: str = sys.executable) -> list[Path]:
    written = []
    for name, spec in kernel_specs(python).items():
        directory = prefix / "share" / "jupyter" / "kernels" / name
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "kernel.json"
        path.write_text(json.dumps(spec, indent=1) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=Path, default=Path(sys.prefix))
    parser.add_argument("--python", default=sys.executable, help="interpreter the kernels run with")
    args = parser.parse_args(argv)
    for path in install(args.prefix, args.python):
        print(path)


if __name__ == "__main__":
    main()
