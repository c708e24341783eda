"""Head maps: profiling finds the known heads, JSON round trip, validation, heatmap."""
from __future__ import annotations

import json

import pytest
import torch

from services.engine import HeadMap, HeadMapError, ProfileParams, profile_model
from services.engine.headmap import shipped_head_map
from services.engine.profiling import kv_heads_of, select_heads
from tests.engine_models import smollm2, tiny


@pytest.mark.slow
def test_profiling_smollm2_selects_layer18_head6():
    loaded = smollm2()
    seen = []
    head_map = profile_model(loaded, ProfileParams(seq_len=128, n_samples=1),
                             progress=lambda done, total, stage: seen.append((done, total)))
    assert (18, 6) in head_map.retrieval_q_heads
    assert head_map.induction[18][6] > 0.6
    assert 6 // loaded.fingerprint.group_size in head_map.retrieval_kv_heads[18]
    assert seen[-1] == (30, 30) and len(seen) == 30  # progress per layer
    # the paper's budget: 15% + 1% of 270 query heads
    assert len(head_map.retrieval_q_heads) == 41 + 3


def test_shipped_map_matches_embedded_model_and_round_trips():
    loaded = smollm2()
    shipped = shipped_head_map(loaded.fingerprint)
    assert shipped is not None and (18, 6) in shipped.retrieval_q_heads
    again = HeadMap.from_json(shipped.to_json(), expect=loaded.fingerprint)
    assert again.version == shipped.version and again.retrieval_kv_heads == shipped.retrieval_kv_heads


def test_selection_widens_to_kv_heads_and_is_deterministic():
    loaded = tiny()
    params = ProfileParams(seq_len=16, n_samples=1, induction_fraction=0.25, echo_fraction=0.1)
    a = profile_model(loaded, params)
    b = profile_model(loaded, params)
    assert a.version == b.version  # same model + parameters -> same map
    fp = loaded.fingerprint
    assert a.retrieval_kv_heads == kv_heads_of(a.retrieval_q_heads, fp)
    ind = torch.tensor(a.induction)
    top = divmod(int(ind.argmax()), fp.n_heads)
    assert top in a.retrieval_q_heads


def test_echo_budget_spent_on_new_heads():
    fp = tiny().fingerprint
    induction = torch.zeros(fp.n_layers, fp.n_heads)
    echo = torch.zeros(fp.n_layers, fp.n_heads)
    induction[1, 2] = 1.0
    echo[1, 2], echo[3, 0] = 1.0, 0.5
    q, kv = select_heads(induction, echo, ProfileParams(induction_fraction=0.01, echo_fraction=0.01), fp)
    assert q == [(1, 2), (3, 0)]
    assert kv == [[], [1], [], [0]]


def test_rejects_other_model_bad_shapes_and_corrupt_json():
    small, other = tiny(0), tiny(1)
    head_map = HeadMap.full(small.fingerprint)
    with pytest.raises(HeadMapError, match="is for model"):
        HeadMap.from_json(head_map.to_json(), expect=other.fingerprint)
    doc = json.loads(head_map.to_json())
    doc["induction"] = doc["induction"][:-1]
    with pytest.raises(HeadMapError, match="induction scores must be"):
        HeadMap.from_json(json.dumps(doc))
    doc = json.loads(head_map.to_json())
    doc["retrieval_kv_heads"][0] = [99]
    with pytest.raises(HeadMapError, match="outside"):
        HeadMap.from_json(json.dumps(doc))
    with pytest.raises(HeadMapError, match="not valid JSON"):
        HeadMap.from_json("{not json")
    with pytest.raises(HeadMapError, match="schema_version"):
        HeadMap.from_json(json.dumps({"schema_version": 99}))


def test_render_png(tmp_path):
    head_map = profile_model(tiny(), ProfileParams(seq_len=16, n_samples=1))
    path = tmp_path / "map.png"
    head_map.render_png(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_profile_params_validation():
    with pytest.raises(ValueError, match="induction_fraction"):
        ProfileParams(induction_fraction=1.5)
    with pytest.raises(ValueError, match="seq_len"):
        ProfileParams(seq_len=0)


@pytest.mark.parametrize("field, value, words", [
    ("retrieval_kv_heads", 0.5, "retrieval_kv_heads must hold integer head indices, got 0.5"),
    ("retrieval_kv_heads", 1.0, "retrieval_kv_heads must hold integer head indices, got 1.0"),
    ("retrieval_kv_heads", True, "retrieval_kv_heads must hold integer head indices, got True"),
    ("retrieval_kv_heads", "1", "retrieval_kv_heads must hold integer head indices"),
    ("retrieval_q_heads", [0, 0.5], r"retrieval_q_heads must hold \[layer, head\] pairs of integers"),
    ("retrieval_q_heads", [True, 1], r"retrieval_q_heads must hold \[layer, head\] pairs of integers"),
    ("retrieval_q_heads", [1.5, 0], r"retrieval_q_heads must hold \[layer, head\] pairs of integers"),
    ("retrieval_q_heads", [0, 1, 2], r"retrieval_q_heads must hold \[layer, head\] pairs of integers"),
    ("induction", "high", "induction scores must be numbers, got 'high'"),
    ("echo", None, "echo scores must be numbers, got None"),
    ("echo", False, "echo scores must be numbers, got False"),
])
def test_head_indices_must_be_ints_and_scores_numbers(field, value, words):
    """A float, bool or string index is not silently truncated or read as 0/1: the map is refused, naming the field."""
    doc = json.loads(HeadMap.full(tiny().fingerprint).to_json())
    if field == "retrieval_kv_heads":
        doc[field][0] = [value]
    elif field == "retrieval_q_heads":
        doc[field][0] = value
    else:
        doc[field][1][2] = value
    with pytest.raises(HeadMapError, match=words):
        HeadMap.from_json(json.dumps(doc))
    kwargs = {"retrieval_q_heads": [tuple(x) for x in doc["retrieval_q_heads"]]}
    with pytest.raises(HeadMapError, match=words):   # constructing one directly is checked the same way
        HeadMap(tiny().fingerprint, doc["induction"], doc["echo"], kwargs["retrieval_q_heads"],
                doc["retrieval_kv_heads"])


def test_int_scores_and_index_types_that_are_ints_still_load():
    fp = tiny().fingerprint
    doc = json.loads(HeadMap.full(fp).to_json())
    doc["induction"][0][0] = 1   # a whole-number score written without a decimal point is a number
    assert HeadMap.from_json(json.dumps(doc), expect=fp).induction[0][0] == 1


def test_a_map_nested_too_deeply_is_a_head_map_error_not_a_crash():
    with pytest.raises(HeadMapError, match="nested too deeply"):
        HeadMap.from_json("[" * 100_000 + "]" * 100_000)
