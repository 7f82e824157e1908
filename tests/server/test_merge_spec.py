import math
import os
import subprocess
import sys

import pytest
from hotmerge.errors import InvalidArgument
from hotmerge.merging.spec import (
    MergeSpec,
    affinity_key,
    canonical_spec,
    is_identity,
    merge_key,
    parse_merge_spec,
)
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy
from hypothesis import given
from hypothesis import strategies as st


def msg(ids=("a", "b"), **fields) -> pb.MergedAdapters:
    return pb.MergedAdapters(ids=list(ids), **fields)


def spec(ids=("a", "b"), **fields) -> MergeSpec:
    return parse_merge_spec(msg(ids, **fields))


def key(s: MergeSpec, revisions=None, dtype="bfloat16") -> str:
    return merge_key(s, revisions or [f"rev-{i}" for i in s.adapter_ids], dtype)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message, field, hint",
    [
        (msg(ids=()), "merged_adapters.ids", "1 to 16"),
        (msg(ids=[f"x{i}" for i in range(17)]), "merged_adapters.ids", "got 17"),
        (msg(ids=["a", ""]), "merged_adapters.ids[1]", "empty"),
        (msg(ids=["a", "  "]), "merged_adapters.ids[1]", "empty"),
        (msg(ids=["a", "b", "a"]), "merged_adapters.ids", "once"),
        (msg(weights=[1.0]), "merged_adapters.weights", "one weight per id"),
        (msg(weights=[1.0, 2.0, 3.0]), "merged_adapters.weights", "one weight per id"),
        (msg(weights=[1.0, math.nan]), "merged_adapters.weights[1]", "finite"),
        (msg(weights=[math.inf, 1.0]), "merged_adapters.weights[0]", "finite"),
        (msg(weights=[1.0, -math.inf]), "merged_adapters.weights[1]", "finite"),
        (msg(merge_strategy=99), "merged_adapters.merge_strategy", "dare_ties"),
        (msg(ids=["a"], merge_strategy=pb.SLERP), "merged_adapters.merge_strategy", "exactly 2"),
        (msg(ids="abc", merge_strategy=pb.SLERP), "merged_adapters.merge_strategy", "exactly 2"),
        (msg(merge_strategy=pb.TIES, density=0.0), "merged_adapters.density", "(0, 1]"),
        (msg(merge_strategy=pb.TIES, density=-0.5), "merged_adapters.density", "(0, 1]"),
        (msg(merge_strategy=pb.DARE_LINEAR, density=1.5), "merged_adapters.density", "(0, 1]"),
        (msg(merge_strategy=pb.MAGNITUDE_PRUNE, density=math.nan), "merged_adapters.density", ""),
        (msg(merge_strategy=pb.DARE_TIES, density=math.inf), "merged_adapters.density", ""),
        (
            msg(merge_strategy=pb.TIES, majority_sign_method=7),
            "merged_adapters.majority_sign_method",
            "frequency",
        ),
    ],
)
def test_bad_spec_is_invalid_argument_naming_the_field(message, field, hint):
    with pytest.raises(InvalidArgument) as info:
        parse_merge_spec(message)
    text = str(info.value)
    assert text.startswith(field), text
    assert hint in text


def test_max_adapters_is_configurable():
    ids = [f"x{i}" for i in range(5)]
    with pytest.raises(InvalidArgument, match="1 to 4 adapter ids, got 5"):
        parse_merge_spec(msg(ids), max_adapters=4)
    assert parse_merge_spec(msg(ids), max_adapters=5).adapter_ids == tuple(ids)
    many = [f"x{i}" for i in range(100)]
    assert len(parse_merge_spec(msg(many), max_adapters=None).adapter_ids) == 100


def test_defaults():
    s = spec(("a", "b", "c"))
    assert s.adapter_ids == ("a", "b", "c")
    assert s.params == MergeParams(
        strategy=Strategy.LINEAR,
        weights=(1.0, 1.0, 1.0),
        density=1.0,
        sign_method=SignMethod.TOTAL,
        seed=0,
    )
    ties = spec(merge_strategy=pb.TIES)
    assert ties.params.density == 1.0
    assert ties.params.sign_method is SignMethod.TOTAL


def test_fields_are_carried_through():
    s = spec(
        weights=[0.5, -2.0],
        merge_strategy=pb.DARE_TIES,
        density=0.25,
        majority_sign_method=pb.FREQUENCY,
        seed=2**64 - 1,
    )
    assert s.params == MergeParams(
        Strategy.DARE_TIES, (0.5, -2.0), 0.25, SignMethod.FREQUENCY, 2**64 - 1
    )


def test_parameters_the_strategy_ignores_are_normalised():
    # A linear merge has no density, sign method or seed: bad values there are not errors
    # and do not make a different spec.
    s = spec(density=7.0, majority_sign_method=99, seed=5)
    assert s == spec()
    assert spec(merge_strategy=pb.TIES, seed=5) == spec(merge_strategy=pb.TIES)
    assert spec(merge_strategy=pb.DARE_LINEAR, majority_sign_method=pb.FREQUENCY) == spec(
        merge_strategy=pb.DARE_LINEAR
    )


@pytest.mark.parametrize("strategy", list(Strategy))
def test_to_message_round_trips(strategy):
    wire = {v: k for k, v in pb.MergeStrategy.items()}
    ids = ("a", "b")
    s = spec(
        ids,
        weights=[0.3, 1.7],
        merge_strategy=pb.MergeStrategy.Value(strategy.name),
        density=0.4,
        majority_sign_method=pb.FREQUENCY,
        seed=11,
    )
    assert parse_merge_spec(s.to_message()) == s
    assert wire[s.to_message().merge_strategy] == strategy.name


# -- keys ----------------------------------------------------------------------------------

# Pinned: a change here changes every key in every deployed cache and balancer. If the change
# is meant, bump KEY_VERSION and update these.
GOLDEN_SPEC = dict(ids=("a", "b"), weights=[0.7, 0.3], merge_strategy=pb.TIES, density=0.5, seed=3)
GOLDEN_CACHE_KEY = "m-ddcd50850d91c41c"
GOLDEN_AFFINITY_KEY = "a-9ac6c07818382559"


def test_keys_are_pinned():
    s = spec(**GOLDEN_SPEC)
    assert merge_key(s, ["r1", "r2"], "bfloat16") == GOLDEN_CACHE_KEY
    assert affinity_key(s) == GOLDEN_AFFINITY_KEY
    assert canonical_spec(s) == (
        '{"adapters":[{"id":"a","weight":"0.699999988079071"},'
        '{"id":"b","weight":"0.30000001192092896"}],'
        '"density":"0.5","sign_method":"total","strategy":"ties","v":1}'
    )


def test_keys_are_the_same_in_another_process():
    code = (
        "from hotmerge.merging.spec import parse_merge_spec, merge_key, affinity_key\n"
        "from hotmerge.v1 import hotmerge_pb2 as pb\n"
        "m = pb.MergedAdapters(ids=['a', 'b'], weights=[0.7, 0.3], merge_strategy=pb.TIES,"
        " density=0.5, seed=3)\n"
        "s = parse_merge_spec(m)\n"
        "print(merge_key(s, ['r1', 'r2'], 'bfloat16'), affinity_key(m))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [GOLDEN_CACHE_KEY, GOLDEN_AFFINITY_KEY]


def test_key_format():
    k = key(spec())
    assert k.startswith("m-") and len(k) == 18 and int(k[2:], 16) >= 0
    a = affinity_key(spec())
    assert a.startswith("a-") and len(a) == 18


def test_key_changes_with_revision_dtype_and_weights():
    s = spec(weights=[0.5, 0.5])
    base = merge_key(s, ["r1", "r2"], "bfloat16")
    assert merge_key(s, ["r1", "r2-reuploaded"], "bfloat16") != base
    assert merge_key(s, ["r2", "r1"], "bfloat16") != base
    assert merge_key(s, ["r1", "r2"], "float16") != base
    assert merge_key(spec(weights=[0.5, 0.25]), ["r1", "r2"], "bfloat16") != base
    # dtype spelled as torch prints it is the same dtype
    assert merge_key(s, ["r1", "r2"], "torch.bfloat16") == base


def test_key_changes_with_strategy():
    keys = {key(spec(merge_strategy=pb.MergeStrategy.Value(s.name))) for s in Strategy}
    assert len(keys) == len(Strategy)


def test_order_of_adapters_matters():
    assert key(spec(("a", "b"), weights=[1, 2])) != key(spec(("b", "a"), weights=[2, 1]))


@pytest.mark.parametrize("strategy", list(Strategy))
def test_density_is_in_the_key_only_where_used(strategy):
    wire = pb.MergeStrategy.Value(strategy.name)
    k1 = key(spec(merge_strategy=wire, density=0.5))
    k2 = key(spec(merge_strategy=wire, density=0.75))
    assert (k1 != k2) == strategy.uses_density
    # unset density is 1.0
    assert key(spec(merge_strategy=wire)) == key(spec(merge_strategy=wire, density=1.0))


@pytest.mark.parametrize("strategy", list(Strategy))
def test_seed_is_in_the_key_only_for_dare(strategy):
    wire = pb.MergeStrategy.Value(strategy.name)
    changed = key(spec(merge_strategy=wire, seed=1)) != key(spec(merge_strategy=wire, seed=2))
    dare = (
        Strategy.DARE_LINEAR,
        Strategy.DARE_TIES,
        Strategy.DARE_LINEAR_SVD,
        Strategy.DARE_TIES_SVD,
    )
    assert changed == (strategy in dare)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_sign_method_is_in_the_key_only_for_ties_family(strategy):
    wire = pb.MergeStrategy.Value(strategy.name)
    total = key(spec(merge_strategy=wire, majority_sign_method=pb.TOTAL))
    frequency = key(spec(merge_strategy=wire, majority_sign_method=pb.FREQUENCY))
    ties = (Strategy.TIES, Strategy.DARE_TIES, Strategy.TIES_SVD, Strategy.DARE_TIES_SVD)
    assert (total != frequency) == (strategy in ties)
    unspecified = key(spec(merge_strategy=wire))
    assert unspecified == total


def test_equivalent_spellings_share_keys():
    plain = msg()
    spelled_out = msg(
        weights=[1.0, 1.0], merge_strategy=pb.LINEAR, density=0.3, majority_sign_method=pb.FREQUENCY
    )
    assert affinity_key(plain) == affinity_key(spelled_out)
    assert key(parse_merge_spec(plain)) == key(parse_merge_spec(spelled_out))


def test_weights_are_float32_and_negative_zero_is_zero():
    # The wire carries float32: a Python-built spec keyed with 0.1 matches the wire's 0.1.
    direct = MergeSpec(("a", "b"), MergeParams(Strategy.LINEAR, (0.1, -0.0)))
    assert affinity_key(direct) == affinity_key(msg(weights=[0.1, 0.0]))


def test_affinity_key_of_message_validates_without_adapter_limit():
    with pytest.raises(InvalidArgument, match="merged_adapters.weights"):
        affinity_key(msg(weights=[1.0]))
    assert affinity_key(msg([f"x{i}" for i in range(40)])).startswith("a-")


def test_cache_key_extends_affinity_text():
    s = spec(merge_strategy=pb.DARE_TIES, density=0.5, seed=9)
    affinity_text = canonical_spec(s)
    cache_text = canonical_spec(s, ["r1", "r2"], "float16")
    assert '"revision":"r1"' in cache_text and '"dtype":"float16"' in cache_text
    assert '"revision"' not in affinity_text and '"dtype"' not in affinity_text
    # same spec, different revisions: different cache keys, one affinity key
    assert key(s, ["r1", "r2"]) != key(s, ["r1", "r3"])


def test_revisions_must_match_ids():
    with pytest.raises(ValueError, match="revisions"):
        merge_key(spec(), ["r1"], "bfloat16")


finite_weights = st.floats(
    min_value=-400, max_value=400, allow_nan=False, width=32
)  # bumped <= 1000
adapter_ids = st.lists(st.text(min_size=1).filter(str.strip), min_size=1, max_size=6, unique=True)


@given(ids=adapter_ids, data=st.data())
def test_key_is_a_function_of_the_canonical_spec(ids, data):
    weights = data.draw(st.lists(finite_weights, min_size=len(ids), max_size=len(ids)))
    strategy = data.draw(st.sampled_from([s for s in Strategy if s is not Strategy.SLERP]))
    density = data.draw(st.floats(min_value=0.125, max_value=1.0, width=32))
    s = spec(
        ids,
        weights=weights,
        merge_strategy=pb.MergeStrategy.Value(strategy.name),
        density=density,
        seed=data.draw(st.integers(0, 2**64 - 1)),
    )
    revisions = [f"r{i}" for i in range(len(ids))]
    # round trip through the wire keeps both keys
    again = parse_merge_spec(s.to_message())
    assert key(again, revisions) == key(s, revisions)
    assert affinity_key(again) == affinity_key(s)
    # any weight change that float32 can see changes the keys
    i = data.draw(st.integers(0, len(ids) - 1))
    bumped = list(s.params.weights)
    bumped[i] = bumped[i] + max(1.0, abs(bumped[i]))
    other = spec(
        ids,
        weights=bumped,
        merge_strategy=pb.MergeStrategy.Value(strategy.name),
        density=density,
        seed=s.params.seed,
    )
    assert key(other, revisions) != key(s, revisions)
    assert affinity_key(other) != affinity_key(s)


# -- identity ------------------------------------------------------------------------------


def test_identity_detection():
    assert is_identity(spec(["a"]))
    assert is_identity(spec(["a"], weights=[1.0], merge_strategy=pb.LINEAR))
    assert is_identity(spec(["a"], merge_strategy=pb.CAT))
    assert is_identity(spec(["a"], merge_strategy=pb.TIES))  # density 1 keeps everything
    assert is_identity(spec(["a"], merge_strategy=pb.DARE_TIES, density=1.0, seed=4))
    assert not is_identity(spec(["a"], merge_strategy=pb.TIES, density=0.5))
    assert not is_identity(spec(["a"], merge_strategy=pb.DARE_LINEAR, density=0.9))
    assert not is_identity(spec(["a"], weights=[0.5]))
    assert not is_identity(spec(["a"], weights=[-1.0]))
    assert not is_identity(spec(["a", "b"]))
    assert not is_identity(spec(["a", "b"], weights=[1.0, 0.0]))


@pytest.mark.parametrize("strategy", list(Strategy))
def test_svd_rank_and_clamp_are_in_the_key_only_for_delta_strategies(strategy):
    wire = pb.MergeStrategy.Value(strategy.name)
    plain = key(spec(merge_strategy=wire))
    ranked = key(spec(merge_strategy=wire, svd_rank=3))
    clamped = key(spec(merge_strategy=wire, svd_clamp=0.9))
    delta = strategy.name.endswith("SVD")
    assert (plain != ranked) == delta and (plain != clamped) == delta
    assert key(spec(merge_strategy=wire, svd_rank=0)) == plain  # 0: the default rank
    parsed = spec(merge_strategy=wire, svd_rank=3, svd_clamp=0.9)
    assert parse_merge_spec(parsed.to_message()) == parsed
    if delta:
        assert parsed.params.svd_rank == 3 and parsed.params.svd_clamp == pytest.approx(0.9)


@pytest.mark.parametrize("clamp", [-0.1, 1.5, float("nan")])
def test_svd_clamp_outside_the_unit_interval_is_rejected(clamp):
    with pytest.raises(InvalidArgument, match="merged_adapters.svd_clamp"):
        spec(merge_strategy=pb.TIES_SVD, svd_clamp=clamp)


@pytest.mark.parametrize("bad", [3.4e38, -1e4, 1000.5])
def test_absurdly_large_weights_are_refused(bad):
    with pytest.raises(InvalidArgument, match=r"weights\[1\] is .* within \[-1000, 1000\]"):
        parse_merge_spec(msg(ids=["a", "b"], weights=[1.0, bad]))
    assert parse_merge_spec(msg(ids=["a", "b"], weights=[1.0, 1000.0])).params.weights[1] == 1000
