"""The benchmark's table and results file: one line per row, and bench/results-<device>-<date>.json, where a
rerun of the same rows replaces them and other rows are kept."""
import datetime
import json
import os
from typing import List, Optional, Tuple

from shards.common.errors import DataError

from .flops import MFU_DEFINITION
from .measure import device_name
from .row import Row

def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def table_cells(r: Row) -> List[str]:
    s = r.settings
    oom = r.status == "OOM"

    def get(key, fmt=str):
        return fmt(s[key]) if s.get(key) is not None else "-"

    if oom:
        mem = "OOM"
    elif r.modelled_peak_mb is not None:
        mem = f"{r.modelled_peak_mb / 1024:.2f} GiB MODELLED (+margin {(r.modelled_total_mb or 0) / 1024:.2f})"
    elif r.peak_mem_mb is not None:
        mem = f"{r.peak_mem_mb / 1024:.1f} GiB ({(r.peak_reserved_mb or 0) / 1024:.1f} resv)"
    elif r.peak_rss_mb is not None:
        mem = f"{r.peak_rss_mb:.0f} MiB RSS"
    else:
        mem = "-"
    rate = "-"
    for value, unit in ((r.samples_per_s, "samples/s"), (r.images_per_s, "images/s")):
        if value is not None:
            rate = f"{value:.3g} {unit}"
    what = r.label or (str(s.get("model") or r.what or "-") + (f", {s['layout']}" if s.get("layout") else ""))
    if s.get("mode") == "full":
        what += f", full{' fused' if s.get('fused_step') else ''} {s.get('optimizer') or ''}".rstrip()
    if s.get("quick"):
        what = "quick: " + what
    return [r.row, what[:56], get("resolution"),
            get("batch" if "batch" in s else "batch_size"),
            get("base_dtype"), get("checkpointing", lambda v: "on" if v else "off"), mem,
            "OOM" if oom else (_fmt_seconds(r.seconds) if r.seconds is not None else "-"),
            "OOM" if oom else rate, "OOM" if oom else (f"{r.mfu:.1%}" if r.mfu is not None else "-"),
            f"{r.ratio:.2f}x of {_fmt_seconds(r.baseline['seconds'])}" if r.ratio is not None
            and isinstance(r.baseline, dict) and "seconds" in r.baseline else "-"]


TABLE_HEADER = ["row", "model / what", "resolution", "batch", "base dtype", "checkpointing", "peak mem",
                "step/median time", "samples/s or images/s", "MFU*", "vs baseline**"]


def format_table(rows: List[Row]) -> str:
    """One text table of every row, with the MFU definition under it."""
    lines = [TABLE_HEADER] + [table_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_HEADER))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text + ["", "* " + MFU_DEFINITION, "** time / the baseline's time: the same bytes read raw (stream), "
                                                     "the checkpoint copied (merge); details in the JSON"])


def results_path(out_dir: str, device, day: Optional[datetime.date] = None) -> str:
    day = day or datetime.date.today()
    return os.path.join(out_dir, f"results-{device_name(device)}-{day.isoformat()}.json")


def _row_key(r: Row) -> str:
    return json.dumps([r.row, r.what, r.settings], sort_keys=True, default=str)


def load_results(path: str) -> Tuple[dict, List[Row]]:
    """A results file's header (everything but its rows) and its rows. Files of every date in bench/ load,
    and so does a stage module's `--json` file, which holds only rows."""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError:
        raise DataError(f"{path} is not a results file (bad JSON); move it away and run again") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows", []), list):
        raise DataError(f"{path} is not a results file (no list of rows)")
    header = {k: v for k, v in data.items() if k != "rows"}
    return header, [Row.from_json(r, path) for r in data.get("rows", [])]


def save_results(path: str, rows: List[Row], header: dict) -> None:
    """Write header + rows atomically; rows already in the file with other settings are kept (a GPU session
    may run the matrix in several commands on one day), rows with the same settings are replaced."""
    from shards.common.atomic import write_json

    kept, commands = [], []
    if os.path.exists(path):
        old, old_rows = load_results(path)
        new_keys = {_row_key(r) for r in rows}
        kept = [r for r in old_rows if _row_key(r) not in new_keys]
        commands = old.get("commands", [])
        if header.get("matmul_peak_flops") is None and old.get("matmul_peak_flops") is not None:
            header = {**header, "matmul_peak_flops": old["matmul_peak_flops"]}  # measured by an earlier train run
    if header["command"] not in commands:
        commands = commands + [header["command"]]
    write_json(path, rows_json({**header, "commands": commands}, kept + rows))


def rows_json(header: dict, rows: List[Row]) -> dict:
    """`header` with the rows, as plain JSON values: default=str, as a row may hold a value JSON has no type
    for (a path object, a dtype)."""
    return json.loads(json.dumps({**header, "rows": [r.to_json() for r in rows]}, default=str))
