"""Run a test selection as N pytest processes side by side and summarise them.

On a GPU most of a kernel test's time is Triton compiling, which is single-threaded per
process; a device machine has 16 cores, so shards finish several times sooner than one
pytest. The tests are collected once, dealt round-robin to the shards (neighbouring tests,
which tend to share compilations, land in different shards), and each shard gets the same
time limit. The summary lists every test as passed, failed, skipped or not finished.

    python bench/gpu_tests.py OUT_DIR [--shards 8] [--limit 180] [-m EXPR] FILES...
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def collect(files: list[str], marks: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marks,
                          "-p", "no:cacheprovider", *files], capture_output=True, text=True)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if not ids and out.returncode not in (0, 5):
        raise SystemExit(f"collection failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return ids


_RESULT_LINE = re.compile(r"(\S+::.*?) (PASSED|FAILED|SKIPPED|ERROR)(?: |$)")


def outcomes(xml_path: Path, log_path: Path) -> dict[str, str]:
    """Test id -> passed / failed / skipped, from a shard's JUnit XML, or where the shard was
    killed before writing it, from the verbose log's result lines."""
    if not xml_path.exists():
        result = {}
        for line in log_path.read_text(errors="replace").splitlines():
            # a test id may hold spaces ("test_bad_input[x type]"): the status ends it
            match = _RESULT_LINE.match(line)
            if match:
                test_id, outcome = match.groups()
                result[test_id] = {"ERROR": "failed"}.get(outcome, outcome.lower())
        return result
    result = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        test_id = f"{path}::{case.get('name')}"
        kinds = {child.tag for child in case}
        result[test_id] = ("failed" if kinds & {"failure", "error"} else
                           "skipped" if "skipped" in kinds else "passed")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--limit", type=float, default=180.0, help="seconds per shard")
    parser.add_argument("-m", dest="marks", default="gpu or not slow")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    ids = collect(args.files, args.marks)
    shards = [ids[i::args.shards] for i in range(args.shards)]
    shards = [s for s in shards if s]
    start = time.monotonic()
    procs = []
    for i, shard in enumerate(shards):
        log = open(args.out_dir / f"shard{i}.log", "w")
        # the same -m as the collection: pyproject's default one would drop the slow tests
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider",
               "-m", args.marks, f"--junitxml={args.out_dir / f'shard{i}.xml'}", *shard]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, args.limit - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    seen: dict[str, str] = {}
    for i in range(len(shards)):
        seen.update(outcomes(args.out_dir / f"shard{i}.xml", args.out_dir / f"shard{i}.log"))
    status = {test_id: seen.get(test_id, "not finished") for test_id in ids}
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    lines = [f"{len(ids)} tests in {len(shards)} shards, {time.monotonic() - start:.0f} s: "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    lines += [f"{s.upper()}: {t}" for t, s in status.items() if s in ("failed", "not finished")]
    (args.out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if set(counts) <= {"passed", "skipped"} else 1


if __name__ == "__main__":
    sys.exit(main())
