"""workers/hardware.keep_freed_memory: freed memory stays in the process for reuse."""

import subprocess
import sys
import textwrap

# Frees a 256 MiB tensor and prints the process's resident MiB before the allocation,
# with it, and after freeing it.
_PROBE = textwrap.dedent("""
    import sys, torch
    from workers.hardware import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    before = rss()
    x = torch.ones(64 * 2**20)  # 256 MiB, touched
    held = rss()
    del x
    print(before, held, rss())
""")


def _rss_mib(mode: str) -> tuple[float, float, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, timeout=120)
    return tuple(float(v) for v in out.stdout.split())


def test_freed_memory_stays_in_the_process_only_when_kept():
    before, held, after = _rss_mib("glibc")
    assert held - before > 200
    assert after - before < 50  # glibc's default: a block this big goes back to the kernel when freed
    before, held, after = _rss_mib("keep")
    assert held - before > 200
    assert after - before > 200  # kept, for the next micro-batch
