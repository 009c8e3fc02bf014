# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The backbone and the feature tap."""

import pytest
import torch
from monai.networks.nets import BasicUNet

from cpcl_bundle.networks import FeatureTap, forward_with_features, unwrap
from cpcl_tools import train_objects
from tests.helpers import TINY_FEATURES


def test_feature_tap_leaves_state_dict_unchanged(tiny_net):
    keys = list(tiny_net.state_dict())
    with FeatureTap(tiny_net, "encoder") as tap:
        logits = tiny_net(torch.randn(1, 1, 32, 32, 32))
        assert list(tiny_net.state_dict()) == keys
    assert list(tiny_net.state_dict()) == keys
    assert tap.features.shape == (1, 16, 2, 2, 2)  # encoder bottleneck: last channel count at 1/16
    assert logits.shape == (1, 2, 32, 32, 32)
    assert not tiny_net.down_4._forward_hooks  # hook removed on exit


def test_checkpoint_of_tapped_network_loads_into_plain_basicunet(tiny_net):
    forward_with_features(tiny_net, torch.randn(1, 1, 32, 32, 32), "decoder_half")
    plain = train_objects.network_def(features=TINY_FEATURES)  # what inference and export build
    assert type(plain) is BasicUNet
    plain.load_state_dict(tiny_net.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    assert torch.equal(plain.eval()(x), tiny_net.eval()(x))


@pytest.mark.parametrize(
    "layer,shape", [("encoder", (2, 16, 2, 2, 2)), ("decoder_half", (2, 4, 16, 16, 16)), ("down_2", (2, 8, 8, 8, 8))]
)
def test_forward_with_features_returns_the_named_layer(tiny_net, layer, shape):
    logits, feats = forward_with_features(tiny_net, torch.randn(2, 1, 32, 32, 32), layer)
    assert feats.shape == shape and logits.shape == (2, 2, 32, 32, 32)


def test_unknown_layer_names_the_choices(tiny_net):
    with pytest.raises(ValueError, match="choose from"):
        FeatureTap(tiny_net, "nope")


def test_paper_backbone_shapes():
    net = train_objects.network_def()
    assert net.down_4.convs.conv_1.conv.out_channels == 256 and net.conv_0.conv_0.conv.out_channels == 16
    assert unwrap(torch.nn.DataParallel(net)) is net


@pytest.mark.parametrize("kind", ["channel", "element"])
def test_dropout_hooks_are_the_references_dropout_and_leave_the_weights_alone(tiny_net, kind):
    """add_dropout: on the bottleneck and the last decoder stage, what Dropout3d (the V-Net's, whole channels) or
    Dropout (SSL4MIS's unet_3D) does there, in training mode only unless ``always``; no new parameter, so the
    state dict loads strictly into the plain network (and its TorchScript form)."""
    from cpcl_bundle.networks import add_dropout

    plain = train_objects.network_def(features=TINY_FEATURES)
    plain.load_state_dict(tiny_net.state_dict())
    seen = {}
    for layer in ("down_4", "upcat_1"):  # registered first: sees the layer's own output
        getattr(tiny_net, layer).register_forward_hook(lambda m, a, out, layer=layer: seen.update({layer: out}))
    handles = add_dropout(tiny_net, 0.5, kind=kind)
    after = {}
    for layer in ("down_4", "upcat_1"):  # registered last: sees the output after dropout
        getattr(tiny_net, layer).register_forward_hook(lambda m, a, out, layer=layer: after.update({layer: out}))
    x = torch.randn(2, 1, 32, 32, 32)
    tiny_net.train()
    tiny_net(x)
    for layer in ("down_4", "upcat_1"):
        raw, dropped = seen[layer], after[layer]
        kept = dropped != 0
        assert torch.allclose(dropped[kept], 2 * raw[kept])  # survivors scaled by 1 / (1 - p)
        if kind == "channel":  # whole feature maps: each (image, channel) all kept or all dropped
            per_map = kept.flatten(2)
            assert torch.equal(per_map.all(-1), per_map.any(-1))
            assert 0.2 < per_map.any(-1).float().mean() < 0.8
        else:
            assert 0.4 < kept.float().mean() < 0.6 and not torch.equal(kept.flatten(2).all(-1), kept.flatten(2).any(-1))
    tiny_net.eval()
    plain.eval()
    assert torch.equal(tiny_net(x), plain(x))  # off in evaluation
    always = add_dropout(plain, 0.5, kind=kind, always=True)
    assert not torch.equal(plain(x), plain(x))  # MC dropout / a teacher in training mode
    for handle in always + handles:
        handle.remove()
    assert set(tiny_net.state_dict()) == set(plain.state_dict())
    scripted = torch.jit.script(train_objects.network_def(features=TINY_FEATURES))
    scripted.load_state_dict(tiny_net.state_dict(), strict=True)


def test_dropout_arguments_are_checked(tiny_net):
    from cpcl_bundle.networks import add_dropout

    with pytest.raises(ValueError, match=r"dropout layer 'centre' is not in BasicUNet"):
        add_dropout(tiny_net, 0.5, layers=("bottleneck", "centre"))
    assert not tiny_net.down_4._forward_hooks  # nothing left half-registered
    with pytest.raises(ValueError, match="choose from"):
        add_dropout(tiny_net, 0.5, kind="spatial")
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        add_dropout(tiny_net, 1.0)
