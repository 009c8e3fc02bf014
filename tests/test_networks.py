# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The backbone and the feature tap."""

import pytest
import torch
from monai.networks.nets import BasicUNet

from cpcl_bundle.networks import FeatureTap, forward_with_features, unet3d, unwrap


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
    plain = BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4))
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
    net = unet3d()
    assert net.down_4.convs.conv_1.conv.out_channels == 256 and net.conv_0.conv_0.conv.out_channels == 16
    assert unwrap(torch.nn.DataParallel(net)) is net
