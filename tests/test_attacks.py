"""Attacks: exact formulas on tiny inputs, batch transforms, Sybil groups and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from p2pfl.aggregation import foolsgold_weights
from p2pfl.attacks import (
    ATTACK_KINDS,
    ATTACKS,
    ModelAttackContext,
    SybilGroup,
    Trigger,
    alie,
    alie_z,
    apply_trigger,
    attack_success_rate,
    backdoor,
    free_rider,
    gaussian,
    get_attack,
    ipm,
    label_flip,
    scaling,
    sign_flip,
    targeted_label_flip,
)
from p2pfl.attacks.data_poisoning import Corner

HONEST = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mean (2, 4)
REF = torch.tensor([1.0, 1.0])  # mean update (1, 3)


# ---------------------------------------------------------------- model poisoning


def test_sign_flip() -> None:
    assert torch.equal(sign_flip(HONEST), torch.tensor([-2.0, -4.0]))
    assert torch.equal(sign_flip(HONEST, REF), torch.tensor([0.0, -2.0]))  # (1,1) - (1,3)
    assert torch.equal(sign_flip(HONEST, REF, scale=2.0), torch.tensor([-1.0, -5.0]))
    own = torch.tensor([3.0, 0.0])
    assert torch.equal(sign_flip(own, REF), torch.tensor([-1.0, 2.0]))  # one vector


def test_ipm_is_minus_eps_times_the_honest_mean() -> None:
    assert torch.equal(ipm(HONEST, eps=0.5), torch.tensor([-1.0, -2.0]))
    assert torch.equal(ipm(HONEST, 0.5, REF), torch.tensor([0.5, -0.5]))  # (1,1) - 0.5*(1,3)


def test_gaussian_adds_seeded_noise() -> None:
    own = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(gaussian(own, 0.0), own)
    noise = torch.randn(3, generator=torch.Generator().manual_seed(7))
    out = gaussian(own, 0.1, torch.Generator().manual_seed(7))
    assert torch.equal(out, own + 0.1 * noise)


def test_scaling_boosts_the_update() -> None:
    assert torch.equal(scaling(torch.tensor([2.0, 3.0]), REF, 10.0), torch.tensor([11.0, 21.0]))


def test_alie_z_from_the_normal_quantile() -> None:
    # n = 10, f = 2: s = floor(6) - 2 = 4, Phi^-1(6/10) = 0.2533471...
    assert alie_z(10, 2) == pytest.approx(0.2533471031357997, abs=1e-12)
    # n = 50, f = 10: s = 26 - 10 = 16, Phi^-1(34/50) = 0.4676987...
    assert alie_z(50, 10) == pytest.approx(0.4676987991145084, abs=1e-12)
    # n = 4, f = 0: s = 3, Phi^-1(1/4) is negative
    assert alie_z(4, 0) == pytest.approx(-0.6744897501960817, abs=1e-12)
    with pytest.raises(ValueError, match="infinite"):
        alie_z(10, 6)


def test_alie_is_mean_plus_z_population_std() -> None:
    honest = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # mean 2, std (1, 0, 1)
    z = alie_z(10, 2)
    assert torch.allclose(alie(honest, 10, 2), torch.tensor([2 + z, 2.0, 2 + z]))
    assert torch.allclose(alie(honest, 10, 2, z=-1.5), torch.tensor([0.5, 2.0, 0.5]))
    assert torch.equal(alie(honest[:1], 10, 2), honest[0])  # one vector: no spread


def test_free_rider_returns_a_copy_of_what_it_received() -> None:
    received = torch.tensor([1.0, 2.0])
    out = free_rider(received)
    out += 1
    assert torch.equal(received, torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------- data poisoning


def test_label_flip_maps_y_to_c_minus_1_minus_y() -> None:
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 9, 4])
    x2, y2 = label_flip(10)(x, y)
    assert y2.tolist() == [9, 8, 0, 5] and x2 is x
    assert y.tolist() == [0, 1, 9, 4]
    with pytest.raises(ValueError, match="num_classes"):
        label_flip(1)


def test_targeted_label_flip_only_touches_the_source_class() -> None:
    _, y2 = targeted_label_flip(3, 8)(torch.zeros(4), torch.tensor([3, 1, 3, 8]))
    assert y2.tolist() == [8, 1, 8, 8]
    with pytest.raises(ValueError, match="differ"):
        targeted_label_flip(2, 2)


@pytest.mark.parametrize(
    "corner, rows, cols",
    [
        ("bottom_right", (3, 5), (3, 5)),
        ("bottom_left", (3, 5), (0, 2)),
        ("top_right", (0, 2), (3, 5)),
        ("top_left", (0, 2), (0, 2)),
    ],
)
def test_trigger_sets_exactly_the_corner_square(
    corner: Corner, rows: tuple[int, int], cols: tuple[int, int]
) -> None:
    x = torch.full((2, 3, 5, 5), 0.25)
    out = apply_trigger(x, Trigger(size=2, value=1.0, corner=corner))
    expected = x.clone()
    expected[..., rows[0] : rows[1], cols[0] : cols[1]] = 1.0
    assert torch.equal(out, expected)
    assert int((out != x).sum()) == 2 * 3 * 4  # 4 pixels in each of 3 channels, 2 images
    assert torch.equal(x, torch.full((2, 3, 5, 5), 0.25))  # input untouched


def test_trigger_on_flattened_images() -> None:
    x = torch.zeros(1, 16)
    out = apply_trigger(x, Trigger(size=2, value=3.0, image_shape=(4, 4)))
    # bottom-right 2x2 of a 4x4 image: flat indices 10, 11, 14, 15
    assert out.nonzero()[:, 1].tolist() == [10, 11, 14, 15]
    assert out[0, 15] == 3.0
    with pytest.raises(ValueError, match="image_shape"):
        apply_trigger(torch.zeros(16))


def test_default_trigger_is_a_3x3_square_of_ones_bottom_right() -> None:
    out = apply_trigger(torch.zeros(8, 8))
    assert out.sum() == 9 and torch.all(out[5:, 5:] == 1)


def test_backdoor_poisons_a_fraction_of_each_batch() -> None:
    x, y = torch.zeros(8, 1, 4, 4), torch.arange(8)
    attack = backdoor(Trigger(size=1), target_label=7, fraction=0.25)
    x2, y2 = attack(x, y)
    assert y2.tolist() == [7, 7, 2, 3, 4, 5, 6, 7]
    assert x2[:2, 0, 3, 3].tolist() == [1.0, 1.0] and x2[:2].sum() == 2
    assert x2[2:].sum() == 0 and x.sum() == 0 and y.tolist() == list(range(8))


def test_backdoor_test_batch_and_success_rate() -> None:
    x, y = torch.zeros(4, 3, 3), torch.tensor([0, 1, 2, 1])
    attack = backdoor(None, target_label=1)
    xt, yt = attack.test_batch(x, y)
    assert yt.tolist() == [1, 1] and xt.shape == (2, 3, 3) and torch.all(xt == 1)
    preds, labels = torch.tensor([1, 1, 0, 1]), torch.tensor([0, 1, 2, 2])
    assert attack_success_rate(preds, labels, target=1) == pytest.approx(2 / 3)
    assert attack_success_rate(preds, labels, target=1, source=2) == 0.5
    assert math.isnan(attack_success_rate(preds, torch.ones(4, dtype=torch.long), target=1))


# ---------------------------------------------------------------- Sybil


def test_sybil_group_sends_identical_copies() -> None:
    vector = torch.tensor([1.0, -2.0, 3.0])
    copies = SybilGroup(4).replicate(vector)
    assert copies.shape == (4, 3) and torch.equal(copies, vector.expand(4, -1))
    copies[0, 0] = 99.0
    assert copies[1, 0] == 1.0 and vector[0] == 1.0


def test_sybil_group_jitter_is_seeded_and_distinct() -> None:
    group = SybilGroup(3, jitter=0.01)
    a = group.replicate(torch.zeros(5), torch.Generator().manual_seed(1))
    b = group.replicate(torch.zeros(5), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    assert float(a.abs().max()) < 0.1


def test_foolsgold_gives_sybil_identities_zero_weight() -> None:
    honest = torch.eye(4)[:3] * torch.tensor([[2.0], [1.0], [3.0]])
    sybils = SybilGroup(3).replicate(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    weights = foolsgold_weights(torch.cat([honest, sybils]))
    # Honest row 1 is 1/sqrt(2)-similar to the sybils: pardoned to 1/2, w = 1/2, and the
    # logit gives ln(1) + 0.5 = 0.5. The other honest rows are orthogonal to everyone.
    assert torch.allclose(weights, torch.tensor([1.0, 0.5, 1.0, 0.0, 0.0, 0.0]).double())


# ---------------------------------------------------------------- registry


def test_registry_names_and_kinds() -> None:
    assert set(ATTACKS) == {
        "none",
        "label_flip",
        "targeted_flip",
        "backdoor",
        "sign_flip",
        "gaussian",
        "scaling",
        "alie",
        "ipm",
        "sybil_label_flip",
        "free_rider",
    }
    assert {n for n, k in ATTACK_KINDS.items() if k == "data"} == {
        "label_flip",
        "targeted_flip",
        "backdoor",
        "sybil_label_flip",
    }
    assert ATTACK_KINDS["none"] == "none"
    for name in ATTACKS:
        assert get_attack(name, **_required(name)).kind == ATTACK_KINDS[name]


def _required(name: str) -> dict[str, int]:
    return {
        "label_flip": {"num_classes": 10},
        "sybil_label_flip": {"num_classes": 10},
        "targeted_flip": {"source": 1, "target": 7},
        "backdoor": {"target_label": 0},
    }.get(name, {})


def test_registry_errors_name_the_accepted_values() -> None:
    with pytest.raises(ValueError, match=r"unknown attack 'flip'; accepted: .*label_flip"):
        get_attack("flip")
    with pytest.raises(ValueError, match=r"does not accept sigma; accepted parameters: scale"):
        get_attack("sign_flip", sigma=1.0)
    with pytest.raises(ValueError, match="needs num_classes"):
        get_attack("label_flip")
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        get_attack("ipm", eps=0)


def test_registry_model_attacks_use_the_context() -> None:
    ctx = ModelAttackContext(
        own=torch.tensor([3.0, 0.0]), reference=REF, honest=HONEST, n_total=10, n_byzantine=2
    )
    assert torch.equal(get_attack("sign_flip")(ctx), torch.tensor([-1.0, 2.0]))
    assert torch.equal(get_attack("ipm", eps=0.5)(ctx), torch.tensor([0.5, -0.5]))
    assert torch.equal(get_attack("scaling", factor=2.0)(ctx), torch.tensor([5.0, -1.0]))
    assert torch.allclose(get_attack("alie")(ctx), alie(HONEST, 10, 2))
    free = get_attack("free_rider")
    assert not free.trains and torch.equal(free(ctx), REF)
    with pytest.raises(ValueError, match="omniscient"):
        get_attack("alie")(ModelAttackContext(own=REF, reference=REF))


def test_registry_data_attacks_and_sybil_group() -> None:
    attack = get_attack("sybil_label_flip", num_classes=10, identities=5)
    assert attack.kind == "data" and attack.sybil == SybilGroup(5, 0.0)
    _, y = attack(torch.zeros(2), torch.tensor([0, 3]))
    assert y.tolist() == [9, 6]
    assert get_attack("sybil_label_flip", num_classes=10).sybil == SybilGroup(10)
    assert get_attack("label_flip", num_classes=10).sybil is None
    bd = get_attack("backdoor", target_label=2, fraction=1.0, size=1, image_shape=[2, 2])
    x, y = bd(torch.zeros(1, 4), torch.tensor([0]))
    assert x.tolist() == [[0.0, 0.0, 0.0, 1.0]] and y.tolist() == [2]


def test_transform_and_craft_dispatch_on_kind() -> None:
    ctx = ModelAttackContext(own=torch.tensor([3.0, 0.0]), reference=REF)
    x, y = torch.zeros(2), torch.tensor([0, 1])
    flip = get_attack("label_flip", num_classes=2)
    assert flip.transform(x, y)[1].tolist() == [1, 0]
    assert torch.equal(flip.craft(ctx), ctx.own)  # a data attack sends its trained model
    none = get_attack("none")
    assert none.transform(x, y)[1] is y and torch.equal(none.craft(ctx), ctx.own)
    assert torch.equal(get_attack("sign_flip").craft(ctx), torch.tensor([-1.0, 2.0]))
    with pytest.raises(TypeError, match="not a batch transform"):
        get_attack("sign_flip").transform(x, y)
