"""Process memory settings: glibc's mmap threshold pinned by the CLI and the Celery app."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# In a fresh interpreter: free a 16 MiB block (glibc then raises its mmap threshold to 16 MiB
# unless it is pinned), then allocate 2 MiB and report whether that block was mapped on its
# own (mallinfo2's hblkhd: bytes in mmapped blocks).
PROBE = textwrap.dedent(
    """
    import ctypes, sys

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    {setup}
    big = bytearray(16 * 2**20)
    del big
    before = libc.mallinfo2().hblkhd
    block = bytearray(2 * 2**20)
    print(libc.mallinfo2().hblkhd - before >= 2 * 2**20)
    """
)


def _mapped_after_big_free(setup: str) -> bool:
    code = PROBE.format(setup=setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"  # (after any help text)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_pinned_threshold_keeps_large_blocks_mapped() -> None:
    # unpinned, glibc's dynamic threshold puts the 2 MiB block on the heap after the big free
    assert not _mapped_after_big_free("")
    assert _mapped_after_big_free(
        "from monitor.memory import pin_mmap_threshold; assert pin_mmap_threshold()"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cli_and_celery_app_pin_it() -> None:
    assert _mapped_after_big_free("import monitor.celery_app")
    assert _mapped_after_big_free(
        "import monitor.cli as cli\n"
        "sys.argv = ['mde-monitor', '--help']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass"
    )
