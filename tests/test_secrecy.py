"""Attacks by one compute party on what it legitimately receives, and the owner-side fixes.

Each test carries out the attack (brute force of a small secret behind an unkeyed hash, label
guessing from record position, a resume on changed data or options) and shows it learns nothing
or is refused. The protocol-randomness and process-isolation attacks live in test_mpc.py and
test_isolation.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors

from veiltrain import data, models, owner, runstate
from veiltrain.config import RunConfig, load_config
from veiltrain.contract import PRIVATE_INITIAL
from veiltrain.errors import ConfigError
from veiltrain.store import Location, read_npz

QUICK = {"max_samples": 120, "batch_size": 32, "test_fraction": 0.25}


def _config(out: Path, **options: Any) -> RunConfig:
    return load_config(**{**QUICK, "out": str(out), **options}).resolved()


def _encrypted(out: Path, **options: Any) -> RunConfig:
    cfg = _config(out, **options)
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    owner.upload(cfg)
    return cfg


# ----------------------------------------------------------------- 2. the settings tag


_PUBLIC = (
    "run_id",
    "model",
    "model_kwargs",
    "batch_size",
    "lr",
    "loss",
    "parties",
    "precision_bits",
)


def _unkeyed(cfg: RunConfig, seed: int) -> str:
    """The old settings hash: SHA-256 of what a party knows plus --seed."""
    fields = {k: getattr(cfg, k) for k in _PUBLIC} | {"seed": seed}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _search(cfg: RunConfig, seen: set[str], seeds: range) -> int | None:
    """The attack: hash the public settings with every small seed, look for a match."""
    return next((s for s in seeds if _unkeyed(cfg, s) in seen), None)


def _strings(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_strings(v) for v in value.values()), set(map(str, value)))
    if isinstance(value, list):
        return set().union(set(), *(_strings(v) for v in value))
    return {str(value)}


def _party_view(cfg: RunConfig, party: int) -> set[str]:
    """Every string a party receives: its job and every JSON object in its store."""
    loc = Location(cfg.stores()[party])
    seen = _strings(json.loads(owner.train_job(cfg).to_json()))
    for name in loc.list():
        if name.endswith(".json"):
            seen |= _strings(loc.read_json(name))
    return seen


def test_the_seed_search_finds_an_unkeyed_settings_hash(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "run", seed=4242)
    assert _search(cfg, {_unkeyed(cfg, 4242)}, range(10_000)) == 4242


def test_parties_see_only_a_keyed_tag_that_no_seed_search_matches(tmp_path: Path) -> None:
    same = {"seed": 4242, "run_id": "same-run"}
    first = _encrypted(tmp_path / "a", **same)
    second = _encrypted(tmp_path / "b", **same)  # identical options, another owner store
    tags = [owner.train_job(cfg).settings_hash for cfg in (first, second)]
    assert tags[0] != tags[1] and all(len(t) == 64 for t in tags)
    for party in range(2):
        assert _search(first, _party_view(first, party), range(10_000)) is None
    assert "4242" not in _party_view(first, 0) | _party_view(first, 1)


# ------------------------------------------------------------ 2b. the initial weights


def _initial(cfg: RunConfig) -> dict[str, torch.Tensor]:
    return load_safetensors(Location(cfg.owner_store).read_bytes(PRIVATE_INITIAL))


def _seeded(reference: str, kwargs: dict[str, Any], seed: int) -> torch.nn.Module:
    """The model as torch.manual_seed(seed) draws it (what a naive owner would share)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.resolve(reference)(**kwargs)


def _seed_search(cfg: RunConfig, target: dict[str, torch.Tensor], seeds: range) -> int | None:
    """The attack: a party knows the factory, its kwargs (the model spec it receives) and maybe
    --seed; it rebuilds the model under every torch seed and looks for the owner's weights."""
    kwargs = json.loads(Location(cfg.stores()[0]).read_bytes("model/spec.json"))["kwargs"]
    for seed in seeds:
        state = _seeded(cfg.model, kwargs, seed).state_dict()
        if all(torch.equal(state[k].float(), v) for k, v in target.items()):
            return seed
    return None


def test_a_torch_seed_search_finds_weights_drawn_under_manual_seed(tmp_path: Path) -> None:
    cfg = _encrypted(tmp_path / "run", seed=4242)
    kwargs = owner.model_kwargs(cfg, [1, 8, 8], 10)
    naive = {k: v.float() for k, v in _seeded(cfg.model, kwargs, 1234).state_dict().items()}
    assert _seed_search(cfg, naive, range(1200, 1300)) == 1234


def test_no_torch_seed_rebuilds_the_owner_s_initial_weights(tmp_path: Path) -> None:
    same = {"seed": 4242, "run_id": "same-run"}
    first = _encrypted(tmp_path / "a", **same)
    target = _initial(first)
    # the user's --seed, small seeds, and the 32-bit truncations of the run's model-init key
    key = runstate.require(Location(first.owner_store), first.run_id).model_init_key(4242)
    low32 = [int.from_bytes(key[i : i + 4], "little") for i in range(0, 32, 4)]
    for seeds in (range(4242, 4243), range(300), *(range(s, s + 1) for s in low32)):
        assert _seed_search(first, target, seeds) is None
    # another owner with the very same options gets other weights (another run key) ...
    other = _initial(_encrypted(tmp_path / "b", **same))
    assert not torch.equal(target["conv.weight"], other["conv.weight"])
    # ... while the owner rebuilds its own: a rerun of the stage gives the same weights.
    owner.encrypt_model(first)
    assert all(torch.equal(v, _initial(first)[k]) for k, v in target.items())


def test_keyed_weights_keep_the_factory_s_distribution() -> None:
    keyed = models.build("small-cnn", {"width": 64}, bytes(range(32)))
    seeded = _seeded("small-cnn", {"width": 64}, 7)
    draws = [m.state_dict()["conv.weight"].flatten() for m in (keyed, seeded)]
    bound = 1 / 3  # kaiming-uniform bound of a 3x3 conv with one input channel: 1/sqrt(9)
    assert all(float(d.abs().max()) <= bound for d in draws)
    assert abs(float(draws[0].std()) - float(draws[1].std())) < 0.02  # uniform: bound/sqrt(3)


def test_the_keyed_generator_state_has_torch_s_own_layout() -> None:
    # Built without any torch seeding: it must still be a state torch reads as a fresh
    # generator's, differing only in the 624 MT19937 words (and the zeroed initial seed).
    fresh = torch.Generator().get_state().numpy()
    keyed = models._keyed_state(bytes(range(32))).numpy()
    assert keyed.shape == fresh.shape
    words = slice(models._MT_STATE_OFFSET, models._MT_STATE_OFFSET + 8 * models._MT_WORDS)
    assert np.array_equal(keyed[8 : words.start], fresh[8 : words.start])
    assert np.array_equal(keyed[words.stop :], fresh[words.stop :])
    assert not keyed[:8].any() and not np.array_equal(keyed[words], fresh[words])
    generator = torch.Generator()
    generator.set_state(torch.from_numpy(keyed))
    other = torch.Generator()
    other.set_state(models._keyed_state(bytes(range(1, 33))))
    assert not torch.equal(torch.rand(8, generator=generator), torch.rand(8, generator=other))


def test_weights_that_get_replaced_come_from_a_fresh_key() -> None:
    # The party's skeleton and the report's restore: no seed anybody could search.
    first, second = (models.build("small-cnn", {}).state_dict()["conv.weight"] for _ in "ab")
    assert not torch.equal(first, second)


# ------------------------------------------------------------ 3. record order and labels


def _class_sorted_npz(path: Path, classes: int = 4, per_class: int = 60) -> Path:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(classes), per_class)  # sorted by class, like an image folder
    x = rng.normal(size=(len(y), 1, 4, 4)) + y[:, None, None, None]
    np.savez(path, x=x, y=y)
    return path


def test_record_position_tells_a_party_nothing_about_labels(tmp_path: Path) -> None:
    source = _class_sorted_npz(tmp_path / "sorted.npz")
    cfg = _encrypted(tmp_path / "run", dataset=str(source), max_samples=None, test_fraction=0.2)
    # The attacker knows the source is class-sorted, the default --seed and the code: it replays
    # the owner's loading and guesses each record's label from its position.
    replay = data.load(str(source), 0.2, 0, None)
    guess = replay.y_train
    truth = owner.training_split(cfg)[1]
    assert len(guess) == len(truth) == 192
    accuracy = float(np.mean(guess == truth))
    assert accuracy < 0.25 + 0.15, accuracy  # chance is 1/4; before the fix it was 100 %
    info = Location(cfg.stores()[0]).read_json("dataset/info.json")
    assert "test_count" not in info


def test_the_record_order_is_drawn_afresh_for_every_run(tmp_path: Path) -> None:
    source = _class_sorted_npz(tmp_path / "sorted.npz")
    orders = []
    for name in ("a", "b"):
        cfg = _encrypted(tmp_path / name, dataset=str(source), max_samples=None, seed=0)
        orders.append(read_npz(Location(cfg.owner_store), "private/record_order.npz"))
    assert not np.array_equal(orders[0]["order"], orders[1]["order"])


# ------------------------------------------------------ 6. one encryption per run id


_CHANGES = {
    "max_samples": 110,
    "test_fraction": 0.3,
    "standardize": False,
    "seed": 1,
    "model": "resnet18",
    "model_kwargs": {"width": 8},
    "batch_size": 16,
    "lr": 0.05,
    "loss": "mse",
    "parties": 3,
    "precision_bits": 20,
    "warm_start": "other",
}


@pytest.mark.parametrize("option", sorted(_CHANGES))
def test_a_rerun_with_other_training_options_is_refused(tmp_path: Path, option: str) -> None:
    cfg = _encrypted(tmp_path / "run", run_id="fixed")
    changed = _config(tmp_path / "run", run_id="fixed", **{option: _CHANGES[option]})
    flag = "--" + option.replace("_", "-")
    for stage in (owner.encrypt_dataset, owner.encrypt_model, owner.train_job):
        with pytest.raises(ConfigError, match=flag):
            stage(changed)
    assert owner.train_job(cfg).settings_hash  # the original run is untouched


def test_every_training_option_is_covered() -> None:
    assert set(_CHANGES) | {"dataset"} == set(runstate.TRAINING_OPTIONS)


def test_a_rerun_on_another_data_set_is_refused(tmp_path: Path) -> None:
    source = _class_sorted_npz(tmp_path / "sorted.npz")
    _encrypted(tmp_path / "run", run_id="fixed")
    changed = _config(tmp_path / "run", run_id="fixed", dataset=str(source))
    with pytest.raises(ConfigError, match="--dataset"):
        owner.encrypt_dataset(changed)


def test_changed_contents_of_the_same_data_file_are_refused(tmp_path: Path) -> None:
    source = _class_sorted_npz(tmp_path / "data.npz")
    cfg = _encrypted(tmp_path / "run", dataset=str(source), max_samples=None)
    with np.load(source) as npz:
        x, y = npz["x"], npz["y"]
    np.savez(source, x=x + 0.5, y=y)
    with pytest.raises(ConfigError, match="data changed"):
        owner.encrypt_dataset(cfg)


def _legacy(state: runstate.RunState, ds: data.Dataset) -> runstate.RunState:
    """The record as a run encrypted before BLAKE3 stored it: HMAC-SHA256 over the same bytes."""
    mac = hmac.new(state.key, digestmod=hashlib.sha256)
    for array in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        mac.update(
            json.dumps([str(array.dtype), list(array.shape)], separators=(",", ":")).encode()
        )
        mac.update(np.ascontiguousarray(array).tobytes())
    mac.update(json.dumps(ds.classes, separators=(",", ":")).encode())
    return dataclasses.replace(state, fingerprint=mac.hexdigest())


def test_the_fingerprint_is_keyed_and_old_runs_keep_theirs(tmp_path: Path) -> None:
    cfg = _encrypted(tmp_path / "run", max_samples=120)
    state = runstate.require(Location(cfg.owner_store), cfg.run_id)
    ds = data.load(cfg.dataset, cfg.test_fraction, cfg.seed, cfg.max_samples)
    changed = dataclasses.replace(ds, x_source=ds.x_source + 1)
    assert state.fingerprint.startswith("blake3:")
    assert state.fingerprint != runstate.fingerprint(runstate.new_key(), ds)  # keyed
    assert runstate.same_data(state, ds) and not runstate.same_data(state, changed)
    old = _legacy(state, ds)
    assert runstate.same_data(old, ds) and not runstate.same_data(old, changed)
    # The attack: a party that guesses the data set (a public one, say) hashes it without a key
    # and looks for the digest, or for the owner's fingerprint, in everything it receives.
    guesses = {state.fingerprint, state.fingerprint.removeprefix("blake3:")}
    for unkeyed in (blake3.blake3(), hashlib.sha256()):
        runstate._digest_split(unkeyed, ds)
        guesses.add(unkeyed.hexdigest())
    for party in range(2):
        seen = _party_view(cfg, party)
        assert not any(guess in text for guess in guesses for text in seen)


def test_a_rerun_reuses_the_encryption(tmp_path: Path) -> None:
    cfg = _encrypted(tmp_path / "run", run_id="fixed")
    job = owner.train_job(cfg)
    party0 = Location(cfg.stores()[0])
    shards = {n: party0.sha256(n) for n in party0.list("dataset")}
    longer = _config(tmp_path / "run", run_id="fixed", epochs=9, timeout_s=30)
    owner.encrypt_dataset(longer)
    owner.upload(longer)
    assert {n: party0.sha256(n) for n in party0.list("dataset")} == shards
    again = owner.train_job(longer)
    assert (again.order_seed, again.settings_hash) == (job.order_seed, job.settings_hash)
    assert again.epochs == 9  # more epochs is a resume, not a new run


# ------------------------------------------------ what a party learns from two-party openings


def _bit_frequencies(words: np.ndarray) -> np.ndarray:
    """How often each of the 64 bits is set."""
    bits = np.unpackbits(words.astype("<i8").view(np.uint8).reshape(-1, 8), axis=1)
    return np.asarray(bits.mean(axis=0))


@pytest.mark.slow
def test_a_party_learns_only_uniform_words_from_the_openings(tmp_path: Path) -> None:
    # The attack: party 1 records every value opened to it while the parties compare, multiply
    # and exponentiate a secret that is the same number everywhere. Masked by fresh triples, the
    # opened words are uniform and never repeat; a reused or missing mask would repeat the
    # secret's structure (equal words, bits stuck at the constant's).
    from test_mpc import PARTY_TIMEOUT_S, PRECISION_BITS, _report, _run
    from veiltrain import sharing

    secret = np.full(4096, np.rint(1.5 * 2.0**PRECISION_BITS), dtype=np.int64)
    for rank, share in enumerate(sharing.split_full(secret, 2)):
        np.savez(tmp_path / f"in_{rank}.npz", a=share)
    finished, _ = _run([0, 1, 2], 2, tmp_path, PARTY_TIMEOUT_S, 120, mode="openings")
    assert all(f.returncode == 0 for f in finished), _report(finished)
    seen = np.load(tmp_path / "out_1.npz")
    assert seen["linked"]  # what crossed the parties' own link (veiltrain.peerlink)
    for kind in ("words", "binary"):
        words = seen[kind]
        assert len(words) > 10_000, kind
        assert len(np.unique(words)) == len(words), f"{kind}: an opened word repeats"
        spread = 5 * 0.5 / np.sqrt(len(words))  # five standard deviations of a fair bit
        assert np.all(np.abs(_bit_frequencies(words) - 0.5) < spread), kind
    bits = seen["bits"]  # B2A: one masked bit a value
    assert set(np.unique(bits)) == {0, 1}
    assert abs(bits.mean() - 0.5) < 5 * 0.5 / np.sqrt(len(bits))
    # ReLU's sign circuit starts with an AND of the parties' own inputs: party 1 receives party
    # 0's input, its share's bit planes, masked. Unmasked, every bit would match those planes.
    from veiltrain import signbits

    received = seen["private"]
    share0 = torch.from_numpy(np.load(tmp_path / "in_0.npz")["a"])
    planes = signbits.to_planes(share0)[: signbits.CARRY_BITS].reshape(-1).numpy()
    assert received.shape == planes.shape
    same = np.unpackbits((~(received ^ planes)).view(np.uint8)).mean()
    assert abs(same - 0.5) < 5 * 0.5 / np.sqrt(received.size * 64)
    assert np.all(np.abs(_bit_frequencies(received) - 0.5) < 5 * 0.5 / np.sqrt(len(received)))


def _layer_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "x": rng.normal(size=(4, 3, 8, 8)),  # 768 values: no other tensor has this size
        "kernel": 0.3 * rng.normal(size=(5, 3, 3, 3)),
        "weight": 1.0 + 0.1 * rng.normal(size=5),
        "bias": 0.1 * rng.normal(size=5),
        "g": 0.1 * rng.normal(size=(4, 5, 8, 8)),  # 1280, the layer's output size
    }


def _torch_layers(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    learnt = {"kernel", "weight", "bias"}
    t = {k: torch.tensor(v, requires_grad=k in learnt) for k, v in values.items()}
    hidden = F.conv2d(t["x"], t["kernel"], padding=1)
    out = torch.relu(F.batch_norm(hidden, None, None, t["weight"], t["bias"], training=True))
    out.backward(t["g"])
    return {"out": out, "kernel_grad": t["kernel"].grad, "weight_grad": t["weight"].grad}


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "full_size_openings"), [("layers", 5), ("layers-exact", 7)])
def test_kept_openings_open_each_value_once_and_no_mask_twice(
    tmp_path: Path, mode: str, full_size_openings: int
) -> None:
    # The attack: party 1 records every word opened to it while the parties run a convolution,
    # BatchNorm and ReLU forward and backward, the products of a training step. A mask used
    # for two different values shows in the difference of the two openings (v1 - a) - (v2 - a):
    # a small number where fresh masks leave uniform words. Kept openings (veiltrain.openings)
    # must not be that: a value that enters several products is opened once, and never again.
    # With exact truncation ("layers-exact") the forward opens two more output-sized words,
    # the convolution's and BatchNorm's products masked by fresh r (its squares are truncated
    # as per-channel sums: 5 words).
    from test_mpc import PARTY_TIMEOUT_S, PRECISION_BITS, _report, _run
    from veiltrain import sharing

    values = _layer_inputs(np.random.default_rng(7))
    encoded = {k: np.rint(v * 2.0**PRECISION_BITS).astype(np.int64) for k, v in values.items()}
    split = {k: sharing.split_full(v, 2) for k, v in encoded.items()}
    for rank in range(2):
        np.savez(tmp_path / f"in_{rank}.npz", **{k: v[rank] for k, v in split.items()})
    finished, _ = _run([0, 1, 2], 2, tmp_path, PARTY_TIMEOUT_S, 120, mode=mode)
    assert all(f.returncode == 0 for f in finished), _report(finished)
    outputs = [np.load(tmp_path / f"out_{rank}.npz") for rank in range(2)]
    expected = _torch_layers(values)
    for name, want in expected.items():
        got = sharing.reconstruct([o[name] for o in outputs]) / 2.0**PRECISION_BITS
        np.testing.assert_allclose(got, want.detach().numpy(), atol=0.02, err_msg=name)
    seen = [outputs[1][k] for k in outputs[1].files if k.startswith("opened_")]
    sizes = [len(words) for words in seen]
    assert sizes.count(768) == 1  # x: its forward product; the kernel gradient reuses it
    # BN's centred values (4 products), ReLU's x and g, BN's incoming g (2), the conv's g: once
    assert sizes.count(1280) == full_size_openings
    for i, first in enumerate(seen):
        for second in seen[i + 1 :]:
            if len(first) == len(second) and len(first) > 16:
                small = np.abs((first - second).astype(np.float64)) < 2.0**40
                assert small.mean() < 0.01, "two openings differ by a small value: one mask twice"
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything), "an opened word repeats"
