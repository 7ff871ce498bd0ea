import copy
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import dino_pytorch
from dino_pytorch import DINO
from reference import official_loss

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    text = README.read_text()
    block = re.search(r"<!-- three-lines:start -->\s*```python\n(.*?)```\s*<!-- three-lines:end -->", text, re.S)
    assert block, "README lost its three-line snippet"
    code = block.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) == 3
    return code


def views(channels=3, size=32, local=16, batch=2, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size, size, generator=g) for _ in range(2)] + [
        torch.randn(batch, channels, local, local, generator=g) for _ in range(n_local)
    ]


class Custom(nn.Module):
    """A user's own backbone: returns (B, 24) features."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def run_readme(backbone, v):
    namespace = {"DINO": DINO, "backbone": backbone, "views": v}
    code = readme_snippet()
    # The snippet's loss must be usable: run it, then backward + step between its lines 2 and 3.
    first, second, third = [line for line in code.splitlines() if line.strip()]
    exec(first, namespace)
    dino = namespace["dino"]
    # Copies of the networks as they are before the snippet's forward: the hand-composed reference.
    student, teacher = copy.deepcopy(dino.student), copy.deepcopy(dino.teacher.module)
    exec(second, namespace)
    loss = namespace["loss"]
    with torch.no_grad():
        teacher_out, student_out = teacher(v[:2]), student(v)
    out_dim = student_out.shape[-1]
    reference = official_loss(student_out, teacher_out, torch.zeros(1, out_dim), teacher_temp=0.04)
    opt = torch.optim.SGD([p for p in dino.parameters() if p.requires_grad], lr=0.1)
    loss.backward()
    opt.step()
    teacher_before = [p.clone() for p in dino.teacher.parameters()]
    exec(third, namespace)
    return dino, loss, teacher_before, reference


def check_after_step(dino, loss, teacher_before, reference):
    ref_loss, ref_center = reference
    assert loss.ndim == 0 and loss.dtype == torch.float32
    # The loss equals the official per-pair loss of the student / teacher outputs composed by hand.
    assert abs(loss.double() - ref_loss).item() <= 1e-5 * ref_loss.abs().item()
    changed = [not torch.equal(a, b) for a, b in zip(teacher_before, dino.teacher.parameters())]
    assert any(changed)  # EMA moved the teacher towards the stepped student
    # The centre was applied once, from this step's raw teacher logits.
    torch.testing.assert_close(dino.criterion.center.double(), ref_center, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_readme_snippet_torchvision_resnet18():
    backbone = torchvision.models.resnet18()
    fc = backbone.fc
    dino, loss, before, ref = run_readme(backbone, views())
    check_after_step(dino, loss, before, ref)
    assert backbone.fc is fc  # not edited
    assert dino.student.head.in_dim == 512
    # The classifier is bypassed: fc takes no part, so it gets no gradient.
    assert backbone.fc.weight.grad is None
    assert backbone.conv1.weight.grad is not None  # trained weights live in the user's object


@pytest.mark.slow
def test_readme_snippet_timm_vit():
    import timm  # the [dev] extra, which `make test` installs
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, dynamic_img_size=True)
    dino, loss, before, ref = run_readme(backbone, views(size=32, local=16))
    check_after_step(dino, loss, before, ref)
    assert dino.student.head.in_dim == 192
    assert backbone.head.weight.grad is None


def test_readme_snippet_custom_module():
    backbone = Custom()
    dino, loss, before, ref = run_readme(backbone, views(channels=1, size=28, local=12))
    check_after_step(dino, loss, before, ref)
    assert dino.student.head.in_dim == 24 and dino.backbone is backbone


def test_trainable_parameters_are_exactly_the_students():
    dino = DINO(Custom(), out_dim=64, hidden_dim=32, bottleneck_dim=8)
    trainable = {id(p) for p in dino.parameters() if p.requires_grad}
    student = {id(p) for p in dino.student.parameters() if p.requires_grad}
    assert trainable == student and len(trainable) > 0
    assert all(not p.requires_grad for p in dino.teacher.parameters())
    assert not list(dino.criterion.parameters())


def test_loss_equals_modules_composed_by_hand():
    torch.manual_seed(0)
    dino = DINO(Custom(), out_dim=64, hidden_dim=32, bottleneck_dim=8)
    v = views(channels=1, size=20, local=10)
    teacher = dino.teacher.module(v[:2])
    student = dino.student(v)
    ref = dino_pytorch.DINOLoss(64)(student, teacher)
    assert torch.allclose(dino(v), ref, rtol=1e-6)


def test_gradient_accumulation_updates_center_once_per_step():
    dino = DINO(Custom(), out_dim=64, hidden_dim=32, bottleneck_dim=8)
    for seed in range(3):
        dino(views(channels=1, size=12, local=8, seed=seed))
    assert torch.count_nonzero(dino.criterion.center) == 0
    dino.update_teacher()
    assert torch.count_nonzero(dino.criterion.center) > 0


def test_embed_dim_inference_and_errors():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 7)

        def forward(self, x):
            return self.fc1(x)

    with pytest.raises(ValueError, match="embed_dim="):
        DINO(MLP(), out_dim=16)
    assert DINO(MLP(), out_dim=16, input_size=(10,), hidden_dim=8, bottleneck_dim=4).student.head.in_dim == 7
    assert DINO(MLP(), out_dim=16, embed_dim=7, hidden_dim=8, bottleneck_dim=4).student.head.in_dim == 7


def test_backbone_with_unusable_output():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return {"x": self.conv(x)}

    with pytest.raises(TypeError, match="returned dict"):
        DINO(Dict(), out_dim=16, embed_dim=4, hidden_dim=8, bottleneck_dim=4)(views())
    with pytest.raises(ValueError, match="num_global_views"):
        DINO(Custom(), out_dim=16, hidden_dim=8, bottleneck_dim=4)([torch.randn(2, 1, 8, 8)])


def test_hook_bypass_when_fx_cannot_trace():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            x = self.conv(x).mean(dim=(2, 3))
            if x.sum() > -1e9:  # data-dependent control flow: FX cannot trace this
                x = x * 1.0
            return self.fc(x)

    backbone = Untraceable()
    dino = DINO(backbone, out_dim=16, hidden_dim=8, bottleneck_dim=4)
    assert type(dino.backbone).__name__ == "BypassClassifier"
    assert dino.student.head.in_dim == 5
    dino(views()).backward()
    assert backbone.fc.weight.grad is None and backbone.conv.weight.grad is not None


def test_public_names():
    for name in ["DINOLoss", "DINOHead", "MultiCropWrapper", "EMATeacher", "MultiCropTransform",
                 "cosine_scheduler", "DINO"]:
        assert hasattr(dino_pytorch, name)
    assert (Path(dino_pytorch.__file__).parent / "py.typed").exists()


def test_classifier_detection():
    from dino_pytorch.features import find_classifier

    class WithHead(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

    assert find_classifier(WithHead(nn.Linear(4, 2))) == "head"
    vgg_like = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3), nn.Dropout())
    assert find_classifier(WithHead(vgg_like)) == "head"
    projection = nn.Sequential(nn.Linear(8, 8), nn.ReLU())  # ends in an activation: a feature layer
    assert find_classifier(WithHead(projection)) is None
    assert find_classifier(WithHead(nn.Identity())) is None
