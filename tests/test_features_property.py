"""The log validator under random damage: every mutation of valid logs is either featurised to finite
tensors or refused with InputError (exit 2) naming a column; never another exception."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from grade.core.errors import InputError
from grade.data.features import FeaturesConfig, extract_features
from tests.test_features import make_logs

N_REQUESTS = 12


def base_table(string_ids: bool) -> pa.Table:
    df = make_logs(N_REQUESTS, seed=5, string_ids=string_ids)
    df["true_ctr"] = df["pred_ctr"] * 0.5
    df["price"] = df["pred_gmv"]
    df["true_segment"] = (df["user_id"] % 3).astype(np.int64)
    df["propensity"] = np.float32(0.5)  # ignored by the features
    return pa.Table.from_pandas(df, preserve_index=False)


def _extreme(t: pa.DataType, draw_index: int):
    """A hostile value of type ``t`` (for numbers: NaN, inf, huge, zero, negative)."""
    if pa.types.is_floating(t):
        return [math.nan, math.inf, -math.inf, 1e30, -1e30, 3.4e38, 0.0, -1.0, 1e-45][draw_index % 9]
    if pa.types.is_integer(t):
        info = np.iinfo(t.to_pandas_dtype())
        return [int(info.max), int(info.min), 0, -1, 2][draw_index % 5]
    if pa.types.is_string(t):
        return ["", " ", "x"][draw_index % 3]
    if pa.types.is_timestamp(t):
        return None
    return None


def _replace(t: pa.Table, name: str, values: list, type_: pa.DataType | None = None) -> pa.Table:
    i = t.schema.get_field_index(name)
    return t.set_column(i, name, pa.array(values, type_ or t.schema.field(name).type))


@st.composite
def mutation(draw, t: pa.Table) -> pa.Table:
    kind = draw(st.sampled_from(["drop", "value", "null", "type", "shuffle", "duplicate", "time"]))
    name = draw(st.sampled_from(t.column_names))
    row = draw(st.integers(0, t.num_rows - 1))
    if kind == "drop":
        return t.drop_columns([name])
    values = t.column(name).to_pylist()
    if kind == "value":
        values[row] = _extreme(t.schema.field(name).type, draw(st.integers(0, 8)))
        return _replace(t, name, values)
    if kind == "null":
        values[row] = None
        return _replace(t, name, values)
    if kind == "type":
        target = draw(st.sampled_from(["string", "float", "int"]))
        if target == "string":
            return _replace(t, name, ["" if v is None else str(v) for v in values], pa.string())
        if target == "float" and not pa.types.is_timestamp(t.schema.field(name).type):
            return _replace(t, name, [float(v) if isinstance(v, (int, float)) else 0.5 for v in values],
                            pa.float64())
        return _replace(t, name, [int(v) if isinstance(v, (int, float)) and math.isfinite(v) else 1
                                  for v in values], pa.int64())
    if kind == "shuffle":
        return t.take(pa.array(draw(st.permutations(range(t.num_rows)))))
    if kind == "duplicate":
        order = list(range(t.num_rows))
        order.insert(draw(st.integers(0, t.num_rows)), row)
        return t.take(pa.array(order))
    # an event_time of another day on one row, or one far in the future in a coarse unit
    times = t.column("event_time").cast(pa.int64()).to_pylist()
    if draw(st.booleans()):
        times[row] += 86_400 * 10**9
        return _replace(t, "event_time", times, pa.timestamp("ns"))
    seconds = [v // 10**9 for v in times]
    seconds[row] = 10**12  # year ~33,700: out of the ns range
    return _replace(t, "event_time", seconds, pa.timestamp("s"))


@st.composite
def damaged_logs(draw) -> pa.Table:
    t = base_table(draw(st.booleans()))
    for _ in range(draw(st.integers(1, 3))):
        t = draw(mutation(t))
        if "event_time" not in t.column_names:
            break
    return t


def _finite_tensors(out: Path) -> int:
    n = 0
    for f in sorted(out.rglob("*.safetensors")):
        for name, a in load_file(str(f)).items():
            if a.dtype.kind == "f":
                assert np.isfinite(a).all(), f"{f.name}: {name} holds non-finite values"
            n += 1
    return n


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(table=damaged_logs(), skip=st.booleans(), batch_rows=st.sampled_from([5, 1000]),
       max_list_size=st.sampled_from([3, 512]))
def test_damaged_logs_are_featurised_finite_or_refused_naming_a_column(table, skip, batch_rows,
                                                                        max_list_size):
    cfg = FeaturesConfig(on_bad_rows="skip" if skip else "fail", valid_fraction=0.2, test_fraction=0.2,
                         batch_rows=batch_rows, max_list_size=max_list_size)
    with tempfile.TemporaryDirectory() as tmp:
        logs, out = Path(tmp) / "logs", Path(tmp) / "out"
        logs.mkdir()
        pq.write_table(table, logs / "part-00000.parquet")
        try:
            spec = extract_features(str(logs), str(out), cfg)
        except InputError as e:
            assert e.column, f"refused without naming a column: {e}"
            assert not out.exists()
            return
        assert _finite_tensors(out) > 0
        assert all(math.isfinite(x) for c in spec["numeric"] for x in (c["mean"], c["std"]))
