"""eval/data_bench.py's measurements: what a command took is its processes' (a launcher's workers
included), as the operating system counts them. (The benchmark itself runs for minutes: not here.)"""

import sys

SPENDS = """
import subprocess, sys, time
block = bytearray(300 * 2**20)  # 300 MiB, touched
for i in range(0, len(block), 4096):
    block[i] = 1
end = time.process_time() + 0.5
while time.process_time() < end:  # half a second of CPU
    pass
if len(sys.argv) > 1:  # and once more in a child, as torchrun's workers are a launcher's
    subprocess.run([sys.executable, "-c", sys.argv[1]], check=True)
"""


def test_a_command_is_measured_with_its_children(eval_script, tmp_path):
    bench = eval_script("data_bench")
    alone = bench.measured([sys.executable, "-c", SPENDS], {}, tmp_path / "alone.log")
    launched = bench.measured([sys.executable, "-c", SPENDS, SPENDS], {}, tmp_path / "launched.log")
    assert 300 <= alone.rss_mib < 600 and 300 <= launched.rss_mib < 600  # the largest process's peak
    assert 0.5 <= alone.cpu < 1.5 and 1.0 <= launched.cpu < 2.5  # the processes' CPU together
    assert alone.wall >= 0.5
