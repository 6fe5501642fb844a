"""The microVM isolation tier ("microvm"), one module per concern:

- ``backend.py``: ``MicrovmBackend``, a ``NetnsBackend`` (the ns tier's network and cgroups) that runs QEMU;
- ``qemu.py``: QEMU's command line, QMP, the KVM probe;
- ``image.py``: kernel, initramfs, erofs layer images and disks, built once and cached;
- ``guest.py``: the scripts that run inside the guest before envd.
"""

from pmoves_e2b.sandbox.backends.microvm.backend import MicrovmBackend

__all__ = ["MicrovmBackend"]
