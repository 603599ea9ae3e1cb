"""What bounds kvsnap's decode attention on this CPU (issue 14).

    python benchmarks/kernel_bound.py [--context 32768] [--isa NAME]

attention.py's 32K target asks the decode call to read K/V at >= 50% of the
machine's read bandwidth. This script puts three measurements of one run side
by side, for attention.py's decode shape (32 query heads, 8 KV heads, head
dim 128, 4-bit K/V in groups of 64, float16 scales):

1. the CPU's ceilings: instructions per nanosecond of integer vector
   multiplies (vpmaddubsw), vector operations (vpaddw), 32-byte loads,
   32-byte stores and the clock (a chain of dependent adds), on 1 thread
   and on all of kvsnap's threads at once (pipes.cpp, compiled here);
2. the kernel's instructions per key and KV head, by class: every
   instruction executed inside kvsnap's extension, counted by valgrind
   (callgrind: exact, one thread) over one call (the difference of a child
   making 2 calls and one making 1, so the setup cancels), classified from
   objdump's disassembly of the extension;
3. the call's time on kvsnap's threads with the caches flushed, and the
   read bandwidth, both as attention.py measures them.

A class's floor is its instructions per key and head x keys x heads / its
ceiling on all threads: no schedule of these instructions takes less time
(the load floor counts every load at the 32-byte loads' rate; cores that
take narrower loads faster make it an overestimate of that one floor).
The largest floor against the 50%-of-bandwidth time says whether the target
can be met by scheduling the instructions better, or only with fewer of them.

x86-64 only (the ceilings are AVX2 assembly); needs valgrind, objdump and
c++ (apt-get install valgrind binutils g++). Prints a table, writes
out/kernel_bound.json and out/kernel_bound.png.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Integer vector multiplies (VEX/EVEX forms; SSE forms without the "v").
MULTIPLIES = {
    "pmaddubsw",
    "pmaddwd",
    "pdpbusd",
    "pdpbusds",
    "pdpwssd",
    "pmulld",
    "pmullw",
    "pmulhw",
    "pmulhuw",
    "pmuludq",
    "pmuldq",
}
# Register-to-register forms of these are renamed away; their memory forms
# are loads or stores (counted as such only), as are broadcasts from memory.
MOVES = re.compile(r"^v?(movdq[au](8|16|32|64)?|movap[sd]|movup[sd]|movs[sd]|mov[dq])$")
BROADCASTS = re.compile(r"^vp?broadcast")
# The kernel sets whose instructions pipes.cpp's loops measure (256-bit AVX2
# integer ops; the float kernels' FMAs have fewer pipes than vpaddw).
MEASURED_ISAS = ("avx2-int",)
# What the counted child writes to stderr when it cannot run the set asked for.
UNCOUNTABLE = "kernel_bound.py child: cannot run kernel set "
CLASSES = ("multiply", "vector", "load", "store", "all")
CEILING_OF = {"multiply": "multiply", "vector": "vector_alu", "load": "load", "store": "store"}


def child(context: int, calls: int, isa: str | None) -> None:
    """The counted process: attention.py's decode data, `calls` calls of
    kvsnap.q4_attention on one thread."""
    import resource

    resource.setrlimit = lambda *a, **k: None  # mlx-lm raises the file limit; valgrind refuses
    import kvsnap
    import mlx.core as mx
    from kvsnap import _ext

    sys.path.insert(0, str(HERE))
    import attention as att

    if isa:
        try:
            _ext.set_isa(isa)
        except kvsnap.errors.InvalidArgumentError:
            # valgrind's emulated CPU has AVX2 but no AVX-512 or AVX-VNNI.
            sys.stderr.write(f"{UNCOUNTABLE}{isa}\n")
            raise SystemExit(3) from None
    q, kq, vq = inputs(context, mx, att)
    for _ in range(calls):
        mx.eval(kvsnap.q4_attention(q, kq, vq, scale=att.SCALE, group_size=64, bits=att.BITS))


def inputs(context: int, mx, att) -> tuple:
    mx.random.seed(0)
    q = mx.random.normal((att.BATCH, att.N_HEADS, 1, att.HEAD_DIM))
    k = mx.random.normal((att.BATCH, att.N_KV_HEADS, context, att.HEAD_DIM))
    v = mx.random.normal((att.BATCH, att.N_KV_HEADS, context, att.HEAD_DIM))
    kq, vq = att.quantize(k, 64), att.quantize(v, 64)
    mx.eval(q, *kq, *vq)
    return q, kq, vq


# ---------------------------------------------------------------------------
# 1. Ceilings


def ceilings(threads: int, workdir: Path, runs: int = 3) -> dict:
    """pipes.cpp's instructions per ns, keyed by loop then "1" / "all": the
    best of `runs` runs (of 9 repeats each), as a neighbour's load on a
    shared host only ever lowers them."""
    exe = workdir / "pipes"
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise SystemExit("kernel_bound.py: needs a C++ compiler (c++ or g++) for pipes.cpp")
    source = str(HERE / "pipes.cpp")
    subprocess.run([cxx, "-O2", "-std=c++17", "-pthread", source, "-o", str(exe)], check=True)
    best: dict = {}
    for _ in range(runs):
        cmd = [str(exe), "1000000", "9", str(threads)]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        for loop, rates in out.items():
            for key, rate in rates.items():
                best.setdefault(loop, {})[key] = max(rate, best.get(loop, {}).get(key, 0.0))
    return best


# ---------------------------------------------------------------------------
# 2. Instruction counts


def extension_path() -> Path:
    from kvsnap import _ext

    return Path(_ext.__file__).resolve()


def callgrind_counts(
    context: int, calls: int, isa: str | None, workdir: Path
) -> collections.Counter:
    """Instructions executed at each address of kvsnap's extension by a child
    making `calls` calls (callgrind, one thread)."""
    out = workdir / f"callgrind.{calls}.out"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--dump-instr=yes",
        "--dump-line=no",
        "--compress-strings=no",
        "--compress-pos=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(context),
        str(calls),
    ]
    if isa:
        cmd.append(isa)
    env = dict(os.environ, KVSNAP_NUM_THREADS="1")
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    if proc.returncode == 3 and UNCOUNTABLE in proc.stderr:
        raise SystemExit(
            f"kernel_bound.py: valgrind cannot run the {isa} kernels (its emulated CPU has "
            "AVX2 but no AVX-512 or AVX-VNNI), so their instructions cannot be counted; "
            "--isa avx2-int or avx2 can"
        )
    if proc.returncode != 0:
        raise SystemExit(f"kernel_bound.py: the counted child failed:\n{proc.stderr[-3000:]}")
    return parse_callgrind(out, extension_path().name)


def parse_callgrind(path: Path, object_name: str) -> collections.Counter:
    """Self cost (Ir) per instruction address of the object named
    `object_name`, from callgrind's uncompressed --dump-instr output."""
    counts: collections.Counter = collections.Counter()
    in_object = skip_next = False
    with open(path) as f:
        for line in f:
            if line.startswith("ob="):
                in_object = Path(line[3:].strip()).name == object_name
            elif line.startswith("calls="):
                skip_next = True  # the next cost line is the call's inclusive cost
            elif line.startswith("0x"):
                if skip_next:
                    skip_next = False
                elif in_object:
                    address, cost = line.split()[:2]
                    counts[int(address, 16)] += int(cost)
    return counts


def disassembly(path: Path) -> dict[int, tuple[str, str]]:
    """Address -> (mnemonic, operands) of the extension's code."""
    text = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    code = {}
    for line in text.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(\S+)\s*(.*)", line)
        if m:
            code[int(m.group(1), 16)] = (m.group(2), m.group(3))
    return code


def classify(mnemonic: str, operands: str) -> set[str]:
    """The classes of one x86 instruction (AT&T syntax, as objdump prints)."""
    classes = {"all"}
    memory = "(" in operands and mnemonic != "lea" and not mnemonic.startswith(("nop", "prefetch"))
    if memory:
        # AT&T: the destination is the last operand; cmp and test only read it.
        writes = "(" in operands.split(",")[-1] and not mnemonic.startswith(
            ("cmp", "test", "vptest")
        )
        classes.add("store" if writes else "load")
    load_only = MOVES.match(mnemonic) or (memory and BROADCASTS.match(mnemonic))
    simd = mnemonic.startswith("v") or re.search(r"%[xyz]mm", operands)  # AVX, or SSE on xmm
    if simd and mnemonic != "vzeroupper" and not load_only:
        classes.add("vector")
        if mnemonic.removeprefix("v") in MULTIPLIES:
            classes.add("multiply")
    return classes


def per_key_counts(counts: collections.Counter, code: dict, key_heads: int) -> dict[str, float]:
    totals = collections.Counter()
    unknown = 0
    for address, n in counts.items():
        if address not in code:
            unknown += n
            continue
        for c in classify(*code[address]):
            totals[c] += n
    if unknown > 0.01 * sum(counts.values()):
        raise SystemExit(
            "kernel_bound.py: callgrind's addresses do not match objdump's (a relocated build?)"
        )
    return {c: totals[c] / key_heads for c in CLASSES}


# ---------------------------------------------------------------------------
# 3. Time and bandwidth (attention.py's way)


def measure(context: int, isa: str | None) -> dict:
    import kvsnap
    import mlx.core as mx
    from kvsnap import _ext

    sys.path.insert(0, str(HERE))
    import attention as att

    mx.set_default_device(mx.cpu)
    if isa:
        _ext.set_isa(isa)
    copy_bytes = max(att.MIN_COPY_BYTES, att.flush_bytes())
    bandwidth = att.measure_bandwidth(copy_bytes, repeats=5)
    q, kq, vq = inputs(context, mx, att)
    flusher = att.CacheFlusher(att.flush_bytes())
    try:
        times, _ = att.time_call(
            lambda: kvsnap.q4_attention(q, kq, vq, scale=att.SCALE, group_size=64, bits=att.BITS),
            att.FULL_TIMING,
            flusher,
        )
    finally:
        flusher.close()
    times.sort()
    return {
        "bandwidth": bandwidth,
        "read_gb_per_s": bandwidth["read_gb_per_s"],
        "kv_bytes": att.nbytes(*kq, *vq),
        "ms_median": 1e3 * times[len(times) // 2],
        "ms_min": 1e3 * times[0],
        "runs": len(times),
        "machine": att.machine_info(bandwidth),
    }


# ---------------------------------------------------------------------------
# Report


def report(context: int, pipes: dict, per_key: dict, timed: dict, threads: int) -> dict:
    import attention as att

    key_heads = context * att.N_KV_HEADS
    all_key = "all" if threads > 1 else "1"
    clock_ghz = pipes["clock"]["1"]  # one add per cycle
    bw = timed["read_gb_per_s"]

    def pct(ms: float) -> float | None:  # None for a class the kernel does not use
        return 100 * timed["kv_bytes"] / (ms * 1e-3) / (bw * 1e9) if ms > 0 else None

    def cycles(ms: float) -> float:  # core cycles per key and head, all threads busy
        return ms * 1e6 * clock_ghz * threads / key_heads

    rows = []
    for c in CLASSES[:-1]:
        ceiling = pipes[CEILING_OF[c]][all_key]
        ms = per_key[c] * key_heads / ceiling / 1e6
        rows.append(
            {
                "what": f"floor: {c} instructions",
                "per_key_and_head": per_key[c],
                "ceiling_per_ns": ceiling,
                "ms": ms,
                "pct_of_bandwidth": pct(ms),
                "cycles_per_key_and_head": cycles(ms),
            }
        )
    rows.append({"what": "all instructions (no ceiling)", "per_key_and_head": per_key["all"]})
    target_ms = 1e3 * timed["kv_bytes"] / (att.TARGET_BANDWIDTH_FRACTION * bw * 1e9)
    rows.append(
        {
            "what": "target: 50% of read bandwidth",
            "ms": target_ms,
            "pct_of_bandwidth": 50.0,
            "cycles_per_key_and_head": cycles(target_ms),
        }
    )
    for name in ("ms_min", "ms_median"):
        ms = timed[name]
        rows.append(
            {
                "what": f"measured ({name[3:]} of {timed['runs']})",
                "ms": ms,
                "pct_of_bandwidth": pct(ms),
                "cycles_per_key_and_head": cycles(ms),
            }
        )
    floor = max(rows[: len(CLASSES) - 1], key=lambda r: r["ms"])
    return {
        "context": context,
        "threads": threads,
        "clock_ghz": clock_ghz,
        "ceilings_per_ns": pipes,
        "instructions_per_key_and_head": per_key,
        "rows": rows,
        "largest_floor": floor["what"],
        "targets": [
            {
                "target": f"decode {context // 1024}K >= 50% of read bandwidth",
                "measured": pct(timed["ms_median"]),
                "goal": 50.0,
                "unit": "%",
                "status": "PASS" if pct(timed["ms_median"]) >= 50 else "MISS",
            },
            {
                "target": "the largest instruction floor leaves room for 50% (floor time <= target time)",
                "measured": floor["pct_of_bandwidth"],
                "goal": 50.0,
                "unit": "%",
                "status": "PASS" if floor["ms"] <= target_ms else "MISS",
            },
        ],
        "machine": timed["machine"],
    }


def print_report(r: dict) -> None:
    import bench_common

    bench_common.print_machine(r["machine"])
    p = r["ceilings_per_ns"]
    print(f"\nceilings (instructions per ns; 1 thread / {r['threads']} threads):")
    for name in ("clock", "multiply", "vector_alu", "load", "store"):
        all_rate = p[name]["all" if r["threads"] > 1 else "1"]
        print(
            f"  {name:<11} {p[name]['1']:7.2f} / {all_rate:7.2f}  ({all_rate / p[name]['1']:.2f}x)"
        )
    print(f"clock: {r['clock_ghz']:.2f} GHz (dependent adds, one thread)\n")
    print(f"decode {r['context'] // 1024}K, {r['threads']} threads:")
    print(f"  {'':<34} {'per key&head':>12} {'ceil/ns':>8} {'ms':>7} {'%BW':>6} {'cycles':>7}")
    for row in r["rows"]:
        cells = [
            f"{row[k]:{spec}}" if row.get(k) is not None else ""
            for k, spec in (
                ("per_key_and_head", "12.1f"),
                ("ceiling_per_ns", "8.2f"),
                ("ms", "7.2f"),
                ("pct_of_bandwidth", "6.1f"),
                ("cycles_per_key_and_head", "7.1f"),
            )
        ]
        print(
            f"  {row['what']:<34} {cells[0]:>12} {cells[1]:>8} {cells[2]:>7} {cells[3]:>6} {cells[4]:>7}"
        )
    print(
        "\ncycles: core cycles per key and KV head with every thread busy (ms x clock x threads / keys x heads)"
    )
    for t in r["targets"]:
        print(f"  {t['status']:<4} {t['target']}: {t['measured']:.1f}%")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in r["rows"] if row.get("ms") is not None]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    n_floors = len(CLASSES) - 1
    colors = ["#8fb3d9"] * n_floors + ["#d98f8f"] + ["#555555"] * (len(rows) - n_floors - 1)
    ax.barh([row["what"] for row in rows], [row["ms"] for row in rows], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode call")
    ax.set_title(
        f"decode {r['context'] // 1024}K on {r['threads']} threads: instruction floors, target, measured"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(int(argv[1]), int(argv[2]), argv[3] if len(argv) > 3 else None)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768, help="keys per head (default 32768)")
    parser.add_argument("--isa", help="kernel set to count and time (default: kvsnap's choice)")
    parser.add_argument(
        "--out", type=Path, default=HERE / "out", help="folder for kernel_bound.json/.png"
    )
    args = parser.parse_args(argv)
    if os.uname().machine != "x86_64" or "avx2" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit(
            "kernel_bound.py: x86-64 with AVX2 only (pipes.cpp's ceilings are AVX2 assembly)"
        )
    for tool in ("valgrind", "objdump"):
        if shutil.which(tool) is None:
            raise SystemExit(f"kernel_bound.py: needs {tool} (apt-get install valgrind binutils)")
    sys.path.insert(0, str(HERE))
    from kvsnap import _ext

    threads = _ext.num_threads()
    # The set to count and time, named to the counted child too: under
    # valgrind kvsnap would otherwise pick the best set valgrind's CPU runs,
    # which need not be the one timed here.
    isa = args.isa or _ext.isa()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        print(
            f"counting one call's instructions under callgrind ({args.context // 1024}K, one thread) ...",
            flush=True,
        )
        with ThreadPoolExecutor(2) as pool:  # the two children run side by side
            one, two = pool.map(lambda n: callgrind_counts(args.context, n, isa, workdir), (1, 2))
        import attention as att

        key_heads = args.context * att.N_KV_HEADS
        per_call = collections.Counter(two)
        per_call.subtract(one)
        per_key = per_key_counts(+per_call, disassembly(extension_path()), key_heads)
        print("measuring the CPU's ceilings (pipes.cpp) ...", flush=True)
        pipes = ceilings(threads, workdir)
    print("timing the call and the read bandwidth ...", flush=True)
    timed = measure(args.context, isa)
    r = report(args.context, pipes, per_key, timed, threads)
    r["isa"] = isa
    if r["isa"] not in MEASURED_ISAS:
        r["caveat"] = (
            f"the ceilings are those of 256-bit vpmaddubsw/vpaddw/loads/stores; the {r['isa']} kernels "
            "use other instructions (float FMAs, vpdpbusd or 512-bit vectors), so these floors "
            "are indicative only"
        )
    r["seconds"] = round(time.time() - started, 1)
    print_report(r)
    if "caveat" in r:
        print(f"\nNOTE: {r['caveat']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_bound.json").write_text(json.dumps(r, indent=2))
    plot(r, args.out / "kernel_bound.png")
    print(f"\nwrote {args.out / 'kernel_bound.json'} and kernel_bound.png ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
