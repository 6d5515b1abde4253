"""Surgery never changes what a model computes when it keeps every pair: for torchvision, timm and
transformers architectures (randomly initialised, small inputs), sampling at ratio 1.0 leaves the
training-mode outputs and gradients and the evaluation outputs equal to the untouched model's."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from approxtrain.attention import PROJECTIONS, ProjectedMultiheadAttention
from approxtrain.run.trainer import logits
from approxtrain.sampling import SamplingConfig
from approxtrain.surgery import approximate_, rules_from_dicts

IMAGES = torch.randn(2, 3, 32, 32)
TOKENS = torch.randint(0, 50, (2, 8))


def torchvision(arch: str, **arguments) -> Callable[[], tuple[nn.Module, Tensor]]:
    def build() -> tuple[nn.Module, Tensor]:
        import torchvision.models

        return torchvision.models.get_model(arch, weights=None, num_classes=5, **arguments), IMAGES
    return build


def timm(name: str, **arguments) -> Callable[[], tuple[nn.Module, Tensor]]:
    def build() -> tuple[nn.Module, Tensor]:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=5, **arguments), IMAGES
    return build


def gpt2() -> tuple[nn.Module, Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)), TOKENS


def bert() -> tuple[nn.Module, Tensor]:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=16, num_labels=5)
    return BertForSequenceClassification(config), TOKENS


def hf_vit() -> tuple[nn.Module, Tensor]:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=5)
    return ViTForImageClassification(config), IMAGES


def weight_normed() -> tuple[nn.Module, Tensor]:
    return nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         parametrizations.spectral_norm(nn.Linear(32, 16)), nn.ReLU(),
                         parametrizations.weight_norm(nn.Linear(16, 5))), IMAGES


TIMM, TRANSFORMERS, SLOW = [pytest.mark.extra("models")], [pytest.mark.extra("models")], [pytest.mark.slow]
ARCHITECTURES = [
    pytest.param(torchvision("resnet18"), id="resnet18"),
    pytest.param(torchvision("mobilenet_v3_small"), id="mobilenet_v3_small"),
    pytest.param(torchvision("mobilenet_v2"), id="mobilenet_v2"),
    pytest.param(torchvision("efficientnet_b0"), id="efficientnet_b0"),
    pytest.param(torchvision("regnet_y_400mf"), id="regnet_y_400mf"),
    pytest.param(torchvision("shufflenet_v2_x0_5"), id="shufflenet_v2_x0_5"),
    pytest.param(torchvision("mnasnet0_5"), id="mnasnet0_5"),
    pytest.param(torchvision("squeezenet1_1"), id="squeezenet1_1"),
    pytest.param(torchvision("convnext_tiny"), id="convnext_tiny", marks=SLOW),
    pytest.param(torchvision("vit_b_16", image_size=32), id="vit_b_16", marks=SLOW),
    pytest.param(weight_normed, id="weight_norm"),
    pytest.param(timm("resnet10t"), id="timm-resnet10t", marks=TIMM),
    pytest.param(timm("nf_regnet_b0"), id="timm-nf_regnet_b0", marks=TIMM),  # ScaledStdConv2d
    pytest.param(timm("tf_efficientnetv2_b0"), id="timm-tf_efficientnetv2_b0", marks=TIMM),  # Conv2dSame
    pytest.param(timm("vit_tiny_patch16_224", img_size=32), id="timm-vit_tiny", marks=TIMM),
    pytest.param(timm("convnext_atto"), id="timm-convnext_atto", marks=TIMM),
    pytest.param(timm("resnetv2_50x1_bit"), id="timm-resnetv2_50x1_bit", marks=[*TIMM, *SLOW]),  # StdConv2d
    pytest.param(gpt2, id="gpt2", marks=TRANSFORMERS),  # Conv1D
    pytest.param(bert, id="bert", marks=TRANSFORMERS),
    pytest.param(hf_vit, id="hf-vit", marks=TRANSFORMERS),
]


def _train_step(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks on both sides
    output = logits(model(x))
    F.mse_loss(output, torch.ones_like(output)).backward()
    return output.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _fused_attention_gradients(model: nn.Module, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Surgery splits an ``nn.MultiheadAttention``'s ``in_proj_weight`` into q/k/v projections (its state_dict keeps
    the fused keys): their gradients concatenated under the fused names, as the untouched model has them."""
    for prefix, module in model.named_modules():
        if isinstance(module, ProjectedMultiheadAttention):
            assert module._qkv_same_embed_dim
            for suffix in ("weight", "bias"):
                names = [f"{prefix}.{projection}.{suffix}" for projection in PROJECTIONS]
                if names[0] in grads:
                    grads[f"{prefix}.in_proj_{suffix}"] = torch.cat([grads.pop(name) for name in names])
    return grads


@pytest.mark.parametrize("build", ARCHITECTURES)
def test_surgery_at_ratio_one_computes_what_the_model_does(build):
    torch.manual_seed(0)
    exact, x = build()
    # in float64: a conv before batch norm has a weight gradient that mostly cancels (|sum| << sum of |terms|), so
    # float32 rounding alone, amplified by the cancellation, put mnasnet's first conv 3e-4 apart on a busy machine
    exact, x = exact.double(), x.double() if x.is_floating_point() else x
    model = copy.deepcopy(exact)
    plan = approximate_(model, rules_from_dicts([{}], SamplingConfig("topk", ratio=1.0)), example_input=x)
    assert any(row.policy == "topk" for row in plan.rows)
    output, grads = _train_step(model, x)
    grads = _fused_attention_gradients(model, grads)
    expected, expected_grads = _train_step(exact, x)
    torch.testing.assert_close(output, expected, rtol=1e-9, atol=1e-10)
    assert grads.keys() == expected_grads.keys()
    # each parameter's gradient to 1e-9 of its norm, plus 1e-11 of the whole gradient's (a gradient that is zero in
    # exact arithmetic -- attention's key bias, a bias before batch norm -- is rounding noise on both sides)
    total = torch.cat([grad.flatten() for grad in expected_grads.values()]).norm()
    for name, grad in grads.items():
        error, norm = (grad - expected_grads[name]).norm(), expected_grads[name].norm()
        assert error <= 1e-9 * norm + 1e-11 * total, (name, float(error), float(norm), float(total))
    model.eval(), exact.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(model(x)), logits(exact(x)), rtol=1e-9, atol=1e-10)
