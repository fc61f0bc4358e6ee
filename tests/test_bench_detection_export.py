"""scripts/bench_detection_export.py's table: the int8/float32 size and latency ratios and the mAP@.5 drop in
points come from the two rows, and every row is printed with its bytes."""

from __future__ import annotations


from conftest import load_script



def test_the_table_states_int8_over_float32_ratios_and_the_map50_drop():
    bench = load_script("bench_detection_export")
    rows = {"float32": {"bytes": 1_000_000, "latency_ms": 8.0, "map50": 0.5000, "map": 0.3000},
            "int8": {"bytes": 350_000, "latency_ms": 2.0, "map50": 0.4850, "map": 0.2900}}
    lines = bench.table(rows, threads=2, repeats=50)
    assert lines[-1] == "ratio size=0.35 latency=0.25 map50_drop_points=1.50"
    assert "2 thread(s), median of 50 invokes" in lines[-2]
    assert lines[1].split()[:2] == ["float32", "1000000"] and lines[2].split()[:2] == ["int8", "350000"]
