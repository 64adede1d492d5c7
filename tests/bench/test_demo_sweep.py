"""benchmarks/demo_sweep.py's seed crossing: every variant once per seed, seed-major, so a
budget cut leaves the same seeds for every variant."""
import pytest


@pytest.fixture(scope="module")
def sweep(load_benchmark):
    return load_benchmark("demo_sweep")


def test_parse_seeds_ranges_and_lists(sweep):
    assert sweep.parse_seeds("0-3") == [0, 1, 2, 3]
    assert sweep.parse_seeds("0,5,7") == [0, 5, 7]
    assert sweep.parse_seeds("1,4-5") == [1, 4, 5]


@pytest.mark.parametrize("bad", ["a", "0-x", "1,,2", ""])
def test_parse_seeds_rejects_bad_text(sweep, bad):
    with pytest.raises(SystemExit, match="--seeds"):
        sweep.parse_seeds(bad)


def test_expand_seeds_is_seed_major_and_keeps_overrides(sweep):
    out = sweep.expand_seeds({"a": {"max_turns": 5}, "b": {}}, [0, 1])
    assert list(out) == ["a_s0", "b_s0", "a_s1", "b_s1"]
    assert out["a_s1"] == {"max_turns": 5, "seed": 1}
    assert out["b_s0"] == {"seed": 0}
    assert sweep.expand_seeds({"a": {}}, None) == {"a": {}}


def test_builtin_variants_use_known_demo_settings(sweep):
    from bunny.train.demo import DemoSettings
    fields = set(DemoSettings.__dataclass_fields__)
    for name, overrides in sweep.VARIANTS.items():
        for key in overrides:
            head = key.split(".", 1)[0]
            assert head in fields or head in ("pretrain", "finetune"), (name, key)


def test_missed_targets_names_each_metric_below_its_floor(sweep):
    row = {"yes_no_accuracy": 0.9, "yes_no_accuracy_hard": 0.79, "open_colour_accuracy": 1.0,
           "open_shape_accuracy": 0.8, "open_count_accuracy": 0.95, "open_position_accuracy": None}
    assert sweep.missed_targets(row) == ["yes_no_accuracy_hard", "open_position_accuracy"]
    assert sweep.missed_targets({k: 1.0 for k in sweep.TARGETS}) == []
