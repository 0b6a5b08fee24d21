"""Run every side-by-side benchmark in one go and keep the results with the machine's description.

    python benchmarks/run_all.py [--quick] [--out benchmarks/results/<date>.txt]

Runs, one after the other (never in parallel: the machines have 2 shared cores):

1. compare_engine.py  -- the server engine in memory vs aiosmtpd fed the same bytes
2. test_client.py     -- the client engine vs smtplib / aiosmtplib
3. test_queue.py      -- the queue scheduler (schedule + complete on 100,000 messages)
4. run_e2e.py         -- over loopback with Postfix's smtp-source vs aiosmtpd and smtp-sink,
                         each runtime's floor (--floor), and durable acceptance vs a private
                         Postfix (skipped, saying so, when smtp-source is not installed)
5. run_delivery.py    -- the delivery agents, connection reuse on vs off, to one loopback MX
                         (smtp-sink when installed, else mailwire's threads server)

Every section prints its own table of medians and ratios taken in the same run.  The
output file starts with the machine's description (CPU, cores, load, Python, kernel), so a
result is never separated from where it was measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}\n"
        f"cpu: {cpu}, {os.cpu_count()} logical cores\n"
        f"load average before: {load}\n"
        f"python: {platform.python_implementation()} {platform.python_version()}\n"
        f"kernel: {platform.system()} {platform.release()}\n"
        f"smtp-source: {shutil.which('smtp-source') or 'not installed'}\n"
    )


def sections(quick: bool) -> list[tuple[str, list[str]]]:
    py = sys.executable
    e2e = [py, os.path.join(HERE, "run_e2e.py"), "--repeat", "1" if quick else "5", "--floor"]
    if quick:
        e2e += ["--scale", "0.2", "--no-postfix"]
    out = [
        ("server engine vs aiosmtpd (in memory)",
         [py, os.path.join(HERE, "compare_engine.py"), "--repeat", "3" if quick else "7"]),
        ("client engine vs smtplib / aiosmtplib", [py, os.path.join(HERE, "test_client.py")]),
        ("queue scheduler",
         [py, "-m", "pytest", os.path.join(HERE, "test_queue.py"), "-q", "--benchmark-only",
          "--benchmark-columns=median,ops", "-p", "no:cacheprovider"]),
    ]  # fmt: skip
    if shutil.which("smtp-source"):
        out.append(("end to end over loopback (smtp-source)", e2e))
    else:
        out.append(("end to end over loopback: SKIPPED, smtp-source is not installed", []))
    delivery = [py, os.path.join(HERE, "run_delivery.py")]
    out.append(
        ("delivery agents, connection reuse on/off", delivery + (["--quick"] if quick else []))
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--out", help="also write everything to this file")
    args = parser.parse_args()
    report = [f"# mailwire benchmarks\n\n{machine()}"]
    print(report[0])
    failed = 0
    for title, cmd in sections(args.quick):
        header = f"\n## {title}\n"
        print(header, flush=True)
        report.append(header)
        if not cmd:
            continue
        start = time.monotonic()
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(HERE))
        text = run.stdout + (f"\n(stderr)\n{run.stderr}" if run.returncode else "")
        text += f"\n({time.monotonic() - start:.0f} s, exit {run.returncode})\n"
        failed += run.returncode != 0
        print(text, flush=True)
        report.append(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("".join(report))
        print(f"written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
