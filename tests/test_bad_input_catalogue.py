"""The bad-input catalogue: every case a clear error naming the argument (or flag) and the value.

Library cases assert the exception type and that the message names the argument and the value.
Program cases assert exit status 2 and exactly one stderr line ``<prog>: error: ...`` naming the flag
and the value (argparse's own errors keep their usage line). Cases that need a library fix in a file
outside this change are strict xfails naming the file and the fix.
"""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dino_pytorch import (
    DINO,
    BatchedMultiCrop,
    DINOHead,
    DINOLoss,
    EMATeacher,
    KoLeoLoss,
    MultiCropRecipe,
    MultiCropTransform,
    MultiCropWrapper,
)
from dino_pytorch.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_into,
    load_official_weights,
    make_official_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from dino_pytorch.cli import eval_knn, eval_linear, plot_curves, train, visualize_attention
from dino_pytorch.eval import extract_features, knn_eval, nearest_neighbours, train_linear_probe, vit_linear_features
from dino_pytorch.features import first_conv_channels, infer_feature_dim
from dino_pytorch.model_config import make_model_config, read_model_config
from dino_pytorch.models import ConvNet, create_model, vit_tiny
from dino_pytorch.sampler import ResumableSampler
from dino_pytorch.schedules import DINOSchedules, cosine_scheduler, cosine_value, teacher_temp_schedule
from dino_pytorch.validate import (
    check_bool,
    check_choice,
    check_device,
    check_int,
    check_number_pair,
    check_path,
    check_positive_float,
    check_positive_int,
    check_probability,
)

NAN, INF = math.nan, math.inf


def xfail(file, fix):
    return pytest.mark.xfail(strict=True, reason=f"needs fix in {file}: {fix}")


def small_dino(**kwargs):
    return DINO(ConvNet(in_chans=1, width=4), out_dim=16, hidden_dim=16, bottleneck_dim=8, input_size=(1, 28, 28),
                **kwargs)


def grey_views(**kwargs):
    """A small 1-channel batched augmenter (one local view of 4x4); the smallest image it takes is 20
    pixels (local_crops_scale[0] = 0.05)."""
    return BatchedMultiCrop(global_crop_size=8, local_crop_size=4, local_crops_number=1, mean=(0.5,), std=(0.5,),
                            **kwargs)


def grey_images(value=None, size=28, dtype=torch.uint8):
    images = torch.zeros(2, 1, size, size, dtype=dtype)
    return images if value is None else images.fill_(value)


def grey_wrapper(**kwargs):
    return MultiCropWrapper(ConvNet(in_chans=1, width=4), nn.Identity(), **kwargs)


def tiny_vit(**kwargs):
    return vit_tiny(depth=1, img_size=16, patch_size=8, in_chans=1, **kwargs)


def sampler_at(epoch, start_batch=0):
    ResumableSampler(10, 2).set_epoch(epoch, start_batch)


class LazyStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.LazyConv2d(4, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def labelled(n=2, channels=1, label=0):
    return [(torch.rand(n, channels, 8, 8), torch.full((n,), label, dtype=torch.long))]


def probe(train=None, val=None, **kwargs):
    """A one-epoch linear probe of a ConvNet on 2 classes (labels 0 unless ``train`` / ``val`` say)."""
    kwargs.setdefault("batch_size_for_lr", 2)
    return train_linear_probe(ConvNet(in_chans=1, width=4), train or labelled(), val or labelled(), 2, epochs=1,
                              **kwargs)


def feats():
    return torch.randn(6, 4), torch.arange(6) % 2


# ------------------------------------------------------------------------------------------- API
# (id, call, exception type, words the message must contain: the argument and the value)
API = [
    ("cosine_epochs_0", lambda: cosine_scheduler(1, 0, 0, 10), ValueError, ["epochs=0"]),
    ("cosine_niter_0", lambda: cosine_scheduler(1, 0, 5, 0), ValueError, ["niter_per_ep=0"]),
    ("cosine_base_nan", lambda: cosine_scheduler(NAN, 0, 5, 2), ValueError, ["base_value=nan"]),
    ("cosine_final_inf", lambda: cosine_scheduler(1, INF, 5, 2), ValueError, ["final_value=inf"]),
    ("cosine_start_nan", lambda: cosine_scheduler(1, 0, 5, 2, 0, NAN), ValueError, ["start_warmup_value=nan"]),
    ("cosine_epochs_negative", lambda: cosine_scheduler(1, 0, -1, 2), ValueError, ["epochs=-1"]),
    ("cosine_warmup_over", lambda: cosine_scheduler(1, 0, 2, 2, 3), ValueError, ["warmup_epochs=3", "epochs=2"]),
    ("cosine_epochs_float", lambda: cosine_scheduler(1, 0, 2.5, 2), ValueError, ["epochs=2.5"]),
    ("cosine_base_str", lambda: cosine_scheduler("1", 0, 2, 2), TypeError, ["base_value='1'"]),
    ("cosine_value_step", lambda: cosine_value(1, 0, 5, 5), ValueError, ["step=5", "total_steps=5"]),
    ("cosine_value_total", lambda: cosine_value(1, 0, 0, 0), ValueError, ["total_steps=0"]),
    ("schedules_total", lambda: DINOSchedules.official(0, lr=1.0), ValueError, ["total_steps=0"]),
    ("schedules_lr_nan", lambda: DINOSchedules.official(10, lr=NAN), ValueError, ["lr=nan"]),
    ("schedules_momentum", lambda: DINOSchedules.official(10, lr=1.0, momentum_teacher=1.5), ValueError,
     ["momentum_teacher=1.5"]),
    ("schedules_warmup", lambda: DINOSchedules.official(10, lr=1.0, warmup_steps=-1), ValueError,
     ["warmup_steps=-1"]),
    ("schedules_at", lambda: DINOSchedules.official(10, lr=1.0).at(-1), ValueError, ["step=-1"]),
    ("teacher_temp_warmup", lambda: teacher_temp_schedule(0.04, 0.04, 5, 3), ValueError,
     ["warmup_teacher_temp_epochs=5"]),
    ("check_positive_int", lambda: check_positive_int("out_dim", 0), ValueError, ["out_dim=0"]),
    ("check_positive_int_bool", lambda: check_positive_int("out_dim", True), ValueError, ["out_dim=True"]),
    ("check_probability", lambda: check_probability("p", 1.5), ValueError, ["p=1.5"]),
    ("check_probability_nan", lambda: check_probability("p", NAN), ValueError, ["p=nan"]),
    ("check_positive_float", lambda: check_positive_float("temp", 0.0), ValueError, ["temp=0.0"]),
    ("check_bool", lambda: check_bool("flag", 1), TypeError, ["flag=1"]),
    ("check_choice", lambda: check_choice("mode", "x", ("a", "b")), ValueError, ["mode='x'"]),
    ("check_pair_short", lambda: check_number_pair("scale", (0.1,)), TypeError, ["scale=(0.1,)"]),
    ("check_pair_inf", lambda: check_number_pair("scale", (0.1, INF)), ValueError, ["scale=(0.1, inf)"]),
    ("check_int_float", lambda: check_int("n", 1.5), ValueError, ["n=1.5"]),
    ("head_in_dim", lambda: DINOHead(0, 16), ValueError, ["in_dim=0"]),
    ("head_out_dim", lambda: DINOHead(8, 0), ValueError, ["out_dim=0"]),
    ("head_hidden_dim", lambda: DINOHead(8, 16, hidden_dim=0), ValueError, ["hidden_dim=0"]),
    ("head_bottleneck_dim", lambda: DINOHead(8, 16, bottleneck_dim=-1), ValueError, ["bottleneck_dim=-1"]),
    ("head_input_width", lambda: DINOHead(8, 16)(torch.randn(4, 10)), ValueError, ["in_dim=8", "10"]),
    ("loss_out_dim", lambda: DINOLoss(0), ValueError, ["out_dim=0"]),
    ("loss_teacher_temp", lambda: DINOLoss(16, teacher_temp=0), ValueError, ["teacher_temp=0"]),
    ("loss_student_temp", lambda: DINOLoss(16, student_temp=-1), ValueError, ["student_temp=-1"]),
    ("loss_center_momentum", lambda: DINOLoss(16, center_momentum=1.5), ValueError, ["center_momentum=1.5"]),
    ("loss_ncrops", lambda: DINOLoss(16, ncrops=1), ValueError, ["ncrops=1"]),
    ("dino_out_dim", lambda: DINO(ConvNet(in_chans=1, width=4), out_dim=0), ValueError, ["out_dim=0"]),
    ("dino_teacher_temp", lambda: small_dino(teacher_temp=0), ValueError, ["teacher_temp=0"]),
    ("dino_view_channels", lambda: small_dino()([torch.randn(2, 3, 28, 28)] * 2, 0), ValueError,
     ["views[0] has 3 channels", "takes in_chans=1"]),
    ("ema_momentum", lambda: EMATeacher(nn.Linear(2, 2), momentum=1.5), ValueError, ["momentum=1.5"]),
    ("save_not_a_dict", lambda: save_checkpoint("x.pth", [1, 2]), TypeError, ["list"]),
    ("official_epoch", lambda: make_official_checkpoint({}, {}, None, -1, None), ValueError, ["epoch=-1"]),
    ("official_student", lambda: make_official_checkpoint(5, {}, None, 0, None), TypeError, ["student", "int"]),
    ("official_args", lambda: make_official_checkpoint({}, {}, None, 0, None, args=3), TypeError, ["args", "int"]),
    ("model_config_arch", lambda: make_model_config("", {}), ValueError, ["arch=''"]),
    ("model_config_value", lambda: make_model_config("convnet", {"width": object()}), TypeError, ["width="]),
    ("model_config_schema", lambda: read_model_config({"model_config": {"arch": "x", "schema_version": 99}}, "f"),
     CheckpointError, ["schema_version=99"]),
    # DINOHead: the official head clamps nlayers with max(nlayers, 1); bools and inputs are named.
    ("head_nlayers_0", lambda: DINOHead(8, 16, nlayers=0), ValueError, ["nlayers=0", "positive int"]),
    ("head_nlayers_negative", lambda: DINOHead(8, 16, nlayers=-3), ValueError, ["nlayers=-3"]),
    ("head_nlayers_float", lambda: DINOHead(8, 16, nlayers=2.5), ValueError, ["nlayers=2.5"]),
    ("head_use_bn_str", lambda: DINOHead(8, 16, use_bn="yes"), TypeError, ["use_bn='yes'", "True or False"]),
    ("head_norm_last_layer_int", lambda: DINOHead(8, 16, norm_last_layer=0), TypeError, ["norm_last_layer=0"]),
    ("head_input_list", lambda: DINOHead(8, 16)([[0.0] * 8]), TypeError, ["x is a list", "in_dim=8"]),
    ("head_input_int", lambda: DINOHead(8, 16)(torch.ones(2, 8, dtype=torch.long)), TypeError,
     ["x has dtype torch.int64", "floating-point"]),
    # BatchedMultiCrop: floats in [0, 1] (checked on CPU tensors), and images the smallest crop fits in.
    ("batched_float_0_255", lambda: grey_views()(grey_images(200.0, dtype=torch.float32)), ValueError,
     ["images has torch.float32 values in [200, 200]", "[0, 1]", "divide by 255"]),
    ("batched_float_normalised", lambda: grey_views()(grey_images(-1.5, dtype=torch.float32)), ValueError,
     ["values in [-1.5, -1.5]", "already normalised"]),
    ("batched_float_nan", lambda: grey_views()(grey_images(NAN, dtype=torch.float32)), ValueError,
     ["values in [nan, nan]"]),
    ("batched_image_1x1", lambda: grey_views()(grey_images(size=1)), ValueError,
     ["images' (H, W)=(1, 1) is 1 pixel", "at least 20", "local_crops_scale[0]=0.05"]),
    ("batched_image_1x1_global_only", lambda: BatchedMultiCrop(local_crops_number=0, global_crops_scale=(0.5, 1.0))(
        grey_images(size=1)), ValueError, ["(1, 1)", "at least 2", "global_crops_scale[0]=0.5"]),
    ("batched_image_sizes_small", lambda: grey_views()(grey_images(), image_sizes=torch.tensor([[28, 28], [4, 4]])),
     ValueError, ["image_sizes[1]=(4, 4) is 16 pixels", "at least 20"]),
    ("batched_sample_params_small", lambda: grey_views().sample_params(2, (2, 2)), ValueError,
     ["image_size=(2, 2) is 4 pixels"]),
    ("batched_return_params", lambda: grey_views()(grey_images(), return_params=1), TypeError, ["return_params=1"]),
    # MultiCropRecipe: statistics on the [0, 1] scale, finite strengths.
    ("recipe_mean_0_255", lambda: MultiCropRecipe(mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4)), ValueError,
     ["mean=(123.7, 116.3, 103.5)", "[0, 1]", "divide mean and std by 255"]),
    ("recipe_mean_nan", lambda: MultiCropRecipe(mean=(NAN,), std=(1.0,)), ValueError, ["mean=(nan,)"]),
    ("recipe_std_inf", lambda: MultiCropRecipe(mean=(0.5,), std=(INF,)), ValueError, ["std=(inf,)", "finite"]),
    ("recipe_brightness_inf", lambda: MultiCropRecipe(brightness=INF), ValueError, ["brightness=inf", "finite"]),
    # MultiCropWrapper: modules, and views the backbone takes (channels read off the backbone).
    ("wrapper_backbone_none", lambda: MultiCropWrapper(None, nn.Identity()), TypeError,
     ["backbone is a NoneType", "nn.Module"]),
    ("wrapper_head_int", lambda: MultiCropWrapper(ConvNet(in_chans=1, width=4), 3), TypeError, ["head is a int"]),
    ("wrapper_in_chans_0", lambda: grey_wrapper(in_chans=0), ValueError, ["in_chans=0"]),
    ("wrapper_view_channels", lambda: grey_wrapper()([torch.randn(2, 3, 28, 28)]), ValueError,
     ["views[0] has 3 channels", "in_chans=1"]),
    ("wrapper_view_3d", lambda: grey_wrapper()([torch.randn(2, 1, 28, 28), torch.randn(1, 28, 28)]), ValueError,
     ["views[1] has shape (1, 28, 28)", "(B, 1, H, W)"]),
    ("wrapper_view_uint8", lambda: grey_wrapper()([torch.zeros(2, 1, 28, 28, dtype=torch.uint8)]), TypeError,
     ["views[0] has dtype torch.uint8", "floating-point"]),
    ("features_input_size_int", lambda: infer_feature_dim(ConvNet(in_chans=1, width=4), 28), TypeError,
     ["input_size=28"]),
    ("features_input_size_zero", lambda: infer_feature_dim(ConvNet(in_chans=1, width=4), (0, 28, 28)), ValueError,
     ["input_size=(0, 28, 28)"]),
    # KoLeoLoss
    ("koleo_list", lambda: KoLeoLoss()([[1.0, 2.0], [3.0, 4.0]]), TypeError, ["features is a list"]),
    ("koleo_int", lambda: KoLeoLoss()(torch.ones(3, 4, dtype=torch.long)), TypeError,
     ["features has dtype torch.int64"]),
    ("koleo_no_columns", lambda: KoLeoLoss()(torch.ones(3, 0)), ValueError, ["features has D=0"]),
    # Schedules
    ("schedules_lr_negative", lambda: DINOSchedules.official(10, lr=-1.0), ValueError, ["lr=-1.0"]),
    ("schedules_weight_decay_negative", lambda: DINOSchedules.official(10, lr=1.0, weight_decay=-0.1), ValueError,
     ["weight_decay=-0.1"]),
    ("schedules_array_nan", lambda: DINOSchedules(np.array([1.0, NAN]), np.ones(2), np.ones(2)), ValueError,
     ["lr[1]=nan"]),
    ("schedules_array_2d", lambda: DINOSchedules(np.ones((2, 2)), np.ones(2), np.ones(2)), ValueError,
     ["lr has shape (2, 2)"]),
    ("schedules_array_str", lambda: DINOSchedules(["a"], np.ones(1), np.ones(1)), TypeError, ["lr is a list"]),
    ("schedules_momentum_array", lambda: DINOSchedules(np.ones(2), np.ones(2), np.array([0.9, 1.5])), ValueError,
     ["momentum[1]=1.5", "[0.0, 1.0]"]),
    ("cosine_value_step_float", lambda: cosine_value(1, 0, 1.5, 5), ValueError, ["step=1.5"]),
    ("cosine_value_total_str", lambda: cosine_value(1, 0, 1, "5"), ValueError, ["total_steps='5'"]),
    ("cosine_value_base_nan", lambda: cosine_value(NAN, 0, 1, 5), ValueError, ["base_value=nan"]),
    ("teacher_temp_nepochs_float", lambda: teacher_temp_schedule(0.04, 0.04, 0, 5.5), ValueError, ["nepochs=5.5"]),
    ("teacher_temp_warmup_negative", lambda: teacher_temp_schedule(0.04, 0.04, -1, 5), ValueError,
     ["warmup_teacher_temp_epochs=-1"]),
    ("teacher_temp_zero", lambda: teacher_temp_schedule(0.0, 0.04, 0, 5), ValueError, ["warmup_teacher_temp=0.0"]),
    # ResumableSampler
    ("sampler_size_float", lambda: ResumableSampler(10.5, 2), ValueError, ["dataset_size=10.5"]),
    ("sampler_size_negative", lambda: ResumableSampler(-1, 2), ValueError, ["dataset_size=-1"]),
    ("sampler_seed_none", lambda: ResumableSampler(10, 2, seed=None), ValueError, ["seed=None"]),
    ("sampler_shuffle_str", lambda: ResumableSampler(10, 2, shuffle="no"), TypeError, ["shuffle='no'"]),
    ("sampler_epoch_negative", lambda: sampler_at(-1), ValueError, ["epoch=-1"]),
    ("sampler_epoch_float", lambda: sampler_at(1.5), ValueError, ["epoch=1.5"]),
    ("sampler_start_batch_float", lambda: sampler_at(1, 1.5), ValueError, ["start_batch=1.5"]),
    ("sampler_start_batch_over", lambda: sampler_at(1, 9), ValueError, ["start_batch=9", "[0, 5]"]),
    # Models
    ("vit_qk_scale_negative", lambda: tiny_vit(qk_scale=-1.0), ValueError, ["qk_scale=-1.0"]),
    ("vit_qk_scale_nan", lambda: tiny_vit(qk_scale=NAN), ValueError, ["qk_scale=nan"]),
    ("vit_qkv_bias_str", lambda: tiny_vit(qkv_bias="yes"), TypeError, ["qkv_bias='yes'"]),
    ("vit_norm_layer_module", lambda: tiny_vit(norm_layer=nn.LayerNorm(4)), TypeError,
     ["norm_layer=LayerNorm((4,)", "not a module instance"]),
    ("vit_norm_layer_none", lambda: tiny_vit(norm_layer=None), TypeError, ["norm_layer=None"]),
    ("vit_mlp_ratio_tiny", lambda: tiny_vit(mlp_ratio=0.001), ValueError, ["mlp_ratio=0.001", "0 hidden units"]),
    ("vit_input_uint8", lambda: tiny_vit()(torch.zeros(2, 1, 16, 16, dtype=torch.uint8)), TypeError,
     ["x has dtype torch.uint8"]),
    ("create_model_torchvision_in_chans", lambda: create_model("resnet18", in_chans=1), TypeError,
     ["create_model('resnet18', in_chans=1)", "timm:resnet18"]),
    # EMATeacher, DINO, the per-image augmenter, the evaluation functions and the checkpoint readers.
    pytest.param("ema_disable_drop_path_str", lambda: EMATeacher(nn.Linear(2, 2), disable_drop_path="no"), TypeError,
                 ["disable_drop_path='no'"], id="ema_disable_drop_path_str"),
    pytest.param("ema_update_student_int", lambda: EMATeacher(nn.Linear(2, 2)).update(3), TypeError,
                 ["student is a int"], id="ema_update_student_int"),
    pytest.param("ema_lazy_student", lambda: EMATeacher(LazyStudent()), ValueError,
                 ["student has uninitialised (lazy) parameters"], id="ema_lazy_student"),
    pytest.param("dino_input_size_int", lambda: DINO(ConvNet(in_chans=1, width=4), out_dim=16, hidden_dim=16,
                                                     bottleneck_dim=8, input_size=28), TypeError, ["input_size=28"],
                 id="dino_input_size_int"),
    # MultiCropTransform: images the smallest crop fits in (PIL images and uint8 tensors).
    ("per_image_1x1", lambda: MultiCropTransform(mean=(0.5,), std=(0.5,))(torch.zeros(1, 1, 1, dtype=torch.uint8)),
     ValueError, ["image=(1, 1) is 1 pixel", "at least 20", "local_crops_scale[0]=0.05"]),
    ("per_image_pil_1x1", lambda: MultiCropTransform(mean=(0.5,), std=(0.5,))(Image.new("L", (1, 1))), ValueError,
     ["image=(1, 1)", "at least 20"]),
    ("per_image_pil_global_only", lambda: MultiCropTransform(local_crops_number=0)(Image.new("RGB", (1, 2))),
     ValueError, ["image=(2, 1) is 2 pixels", "at least 3", "global_crops_scale[0]=0.4"]),
    # k-NN: ks an iterable of positive ints, extract_features' model, device and flag.
    ("knn_eval_ks_int", lambda: knn_eval(*feats(), *feats(), ks=5), TypeError, ["ks=5", "iterable of positive ints"]),
    ("knn_eval_ks_str", lambda: knn_eval(*feats(), *feats(), ks="5"), TypeError, ["ks='5'"]),
    ("knn_eval_ks_zero", lambda: knn_eval(*feats(), *feats(), ks=(5, 0)), ValueError, ["ks[1]=0", "positive int"]),
    ("knn_eval_ks_over", lambda: knn_eval(*feats(), *feats(), ks=(5, 7)), ValueError,
     ["ks[1]=7", "only 6 training features"]),
    ("extract_features_model_int", lambda: extract_features(3, labelled()), TypeError,
     ["model is a int", "nn.Module"]),
    ("extract_features_normalize_str", lambda: extract_features(ConvNet(in_chans=1, width=4), labelled(),
                                                                normalize="no"), TypeError, ["normalize='no'"]),
    ("extract_features_device", lambda: extract_features(ConvNet(in_chans=1, width=4), labelled(), "gpu0"),
     ValueError, ["device='gpu0'", "device string"]),
    ("nearest_neighbours_normalize_int", lambda: nearest_neighbours(feats()[0], feats()[0], 2, normalize=1),
     TypeError, ["normalize=1"]),
    # Linear probe: the optimiser's arguments as given, the labels, the device, ViT-only flags.
    ("linear_probe_lr_nan", lambda: probe(lr=NAN), ValueError, ["lr=nan"]),
    ("linear_probe_lr_negative", lambda: probe(lr=-1.0), ValueError, ["lr=-1.0", ">= 0"]),
    ("linear_probe_batch_size_0", lambda: probe(batch_size_for_lr=0), ValueError, ["batch_size_for_lr=0"]),
    ("linear_probe_batch_size_float", lambda: probe(batch_size_for_lr=2.5), ValueError, ["batch_size_for_lr=2.5"]),
    ("linear_probe_momentum", lambda: probe(momentum=2.0), ValueError, ["momentum=2.0", "[0, 1]"]),
    ("linear_probe_weight_decay_nan", lambda: probe(weight_decay=NAN), ValueError, ["weight_decay=nan"]),
    ("linear_probe_device", lambda: probe(device="gpu0"), ValueError, ["device='gpu0'"]),
    ("linear_probe_backbone_int", lambda: train_linear_probe(3, labelled(), labelled(), 2, batch_size_for_lr=2),
     TypeError, ["backbone is a int"]),
    ("linear_probe_log_int", lambda: probe(log=3), TypeError, ["log=3", "callable"]),
    ("linear_probe_precompute_str", lambda: probe(precompute_features="yes"), TypeError,
     ["precompute_features='yes'"]),
    ("linear_probe_train_label_over", lambda: probe(train=labelled(label=5)), ValueError,
     ["train_loader yielded the label 5 in batch 0", "num_labels=2"]),
    ("linear_probe_val_label_negative", lambda: probe(val=labelled(label=-1)), ValueError,
     ["val_loader yielded the label -1", "num_labels=2"]),
    ("linear_probe_precomputed_label_over", lambda: probe(val=labelled(label=2), precompute_features=True),
     ValueError, ["val_loader yielded the label 2", "num_labels=2"]),
    ("linear_probe_avgpool_non_vit", lambda: probe(avgpool_patchtokens=True), ValueError,
     ["avgpool_patchtokens=True", "(ConvNet) has no get_intermediate_layers"]),
    ("linear_features_interleave_non_vit",
     lambda: vit_linear_features(ConvNet(in_chans=1, width=4), torch.rand(2, 1, 8, 8), official_interleave=True),
     ValueError, ["official_interleave=True", "not a ViT"]),
    ("linear_features_avgpool_int", lambda: vit_linear_features(tiny_vit(), torch.rand(2, 1, 16, 16), 1, 1),
     TypeError, ["avgpool_patchtokens=1"]),
    # Reading checkpoints: arguments checked before the file is opened (x.pth does not exist).
    ("load_checkpoint_none", lambda: load_checkpoint(None), TypeError, ["path=None", "os.PathLike"]),
    ("save_checkpoint_path_none", lambda: save_checkpoint(None, {}), TypeError, ["path=None"]),
    ("load_into_not_module", lambda: load_into(3, None, "x.pth"), TypeError, ["model_backbone is a int"]),
    ("load_into_head_int", lambda: load_into(ConvNet(in_chans=1, width=4), 3, "x.pth"), TypeError,
     ["head is a int", "nn.Module or None"]),
    ("read_checkpoint_trusted_str", lambda: read_checkpoint("x.pth", trusted="yes"), TypeError,
     ["trusted='yes'", "True or False"]),
    ("load_checkpoint_map_location_gpu0", lambda: load_checkpoint("x.pth", map_location="gpu0"), ValueError,
     ["map_location='gpu0'", "device string"]),
    ("read_checkpoint_map_location_int", lambda: read_checkpoint("x.pth", map_location=3), TypeError,
     ["map_location=3", "callable"]),
    ("load_checkpoint_map_location_dict", lambda: load_checkpoint("x.pth", map_location={"cuda:0": "gpu0"}),
     ValueError, ["map_location['cuda:0']='gpu0'"]),
    pytest.param("load_checkpoint_map_location_no_cuda", lambda: load_checkpoint("x.pth", map_location="cuda"),
                 ValueError, ["map_location='cuda'", "CUDA is not available"],
                 id="load_checkpoint_map_location_no_cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    ("check_device", lambda: check_device("device", "gpu0"), ValueError, ["device='gpu0'"]),
    ("check_device_float", lambda: check_device("device", 0.5), TypeError, ["device=0.5"]),
    ("check_path_int", lambda: check_path("path", 3), TypeError, ["path=3"]),
]


@pytest.mark.parametrize("case_id, call, error, words",
                         [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in API])
def test_api(case_id, call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), str(info.value)


class SpaceToDepthNet(nn.Module):
    """A TResNet-like stem: 2x2 space-to-depth first, so its first conv takes 4x the image channels."""

    def __init__(self, in_chans=1):
        super().__init__()
        self.in_chans = in_chans
        self.conv = nn.Conv2d(4 * in_chans, 8, 3)

    def forward(self, x):
        return self.conv(nn.functional.pixel_unshuffle(x, 2)).mean(dim=(2, 3))


class LinearPatchNet(nn.Module):
    """A linear patch embedding (as timm's NaFlexViT): no convolution at all."""

    def __init__(self, in_chans=1, patch=4):
        super().__init__()
        self.in_chans, self.patch = in_chans, patch
        self.embed = nn.Linear(in_chans * patch * patch, 8)

    def forward(self, x):
        return self.embed(nn.functional.unfold(x, self.patch, stride=self.patch).transpose(1, 2)).mean(dim=1)


@pytest.mark.parametrize("backbone", [SpaceToDepthNet, LinearPatchNet])
def test_api_channel_check_reads_in_chans(backbone):
    """The first conv's channels were wrong (4: 1-channel views refused) or missing (no check: a raw
    matmul error); the model's in_chans is right."""
    model = backbone()
    assert first_conv_channels(model) == 1
    dino = DINO(model, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    dino([torch.randn(2, 1, 28, 28)] * 2)
    with pytest.raises(ValueError, match=r"views\[0\] has 3 channels"):
        dino([torch.randn(2, 3, 28, 28)] * 2)
    with pytest.raises(ValueError, match=r"views\[0\] has 3 channels, but the backbone takes in_chans=1"):
        dino.student([torch.randn(2, 3, 28, 28)])


def test_api_lazy_conv_channels_are_unknown():
    """A lazy conv has 0 input channels until its first forward: unknown (no check), not 0 (every view refused)."""
    assert first_conv_channels(LazyStudent()) is None
    assert MultiCropWrapper(LazyStudent(), nn.Identity())([torch.randn(2, 1, 8, 8)]).shape == (2, 4)


def test_api_backbone_without_parameters_warns():
    with pytest.warns(UserWarning, match=r"backbone \(Sequential\) has no parameters"):
        DINO(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), out_dim=16, hidden_dim=16, bottleneck_dim=8)


def test_api_checkpoint_files(tmp_path):
    missing, empty = tmp_path / "missing.pth", tmp_path / "empty.pth"
    empty.write_bytes(b"")
    torch.save({"teacher": {"w": torch.ones(1)}}, tmp_path / "t.pth")
    cases = [
        (lambda: save_checkpoint(tmp_path / "no" / "x.pth", {}), FileNotFoundError, ["no/x.pth"]),
        (lambda: load_checkpoint(missing), CheckpointError, [str(missing), "does not exist"]),
        (lambda: load_checkpoint(tmp_path), CheckpointError, [str(tmp_path), "directory"]),
        (lambda: load_checkpoint(empty), CheckpointError, [str(empty), "empty"]),
        (lambda: load_official_weights(tmp_path / "t.pth", checkpoint_key="nope"), CheckpointError,
         ["checkpoint_key='nope'"]),
        (lambda: load_into(ConvNet(in_chans=1, width=4), None, tmp_path / "t.pth"), CheckpointError,
         ["t.pth", "missing"]),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as info:
            call()
        assert all(word in str(info.value) for word in words), str(info.value)


# -------------------------------------------------------------------------------------- programs

TRAIN = ["--dataset", "fashion_mnist", "--arch", "convnet", "--width", "4", "--out_dim", "16", "--hidden_dim", "16",
         "--bottleneck_dim", "8", "--batch_size_per_gpu", "8", "--local_crops_number", "0", "--max_steps", "1",
         "--num_workers", "0", "--no_final_knn", "--no_progress", "--attention_maps", "0", "--device", "cpu"]
PROGRAMS = {"dino-train": train.main, "dino-eval-knn": eval_knn.main, "dino-eval-linear": eval_linear.main,
            "dino-visualize-attention": visualize_attention.main, "dino-plot-curves": plot_curves.main}
FILE, DIR = "<file>", "<dir>"

# (program, argv, words of the one line: the flag and the value)
PROGRAM_CASES = [
    ("dino-train", ["--lr", "-0.01"], ["--lr", "-0.01"]),
    ("dino-train", ["--max_steps", "-5"], ["--max_steps", "-5"]),
    ("dino-train", ["--epochs", "0"], ["--epochs", "0"]),
    ("dino-train", ["--batch_size_per_gpu", "0"], ["--batch_size_per_gpu", "0"]),
    ("dino-train", ["--out_dim", "0"], ["--out_dim", "0"]),
    ("dino-train", ["--hidden_dim", "-1"], ["--hidden_dim", "-1"]),
    ("dino-train", ["--bottleneck_dim", "0"], ["--bottleneck_dim", "0"]),
    ("dino-train", ["--momentum_teacher", "1.5"], ["--momentum_teacher", "1.5"]),
    ("dino-train", ["--teacher_temp", "0"], ["--teacher_temp", "0"]),
    ("dino-train", ["--warmup_teacher_temp", "-0.04"], ["--warmup_teacher_temp", "-0.04"]),
    ("dino-train", ["--drop_path_rate", "1.0"], ["--drop_path_rate", "1.0"]),
    ("dino-train", ["--weight_decay", "-1"], ["--weight_decay", "-1"]),
    ("dino-train", ["--clip_grad", "nan"], ["--clip_grad", "nan"]),
    ("dino-train", ["--min_lr=-1e-6"], ["--min_lr", "-1e-06"]),
    ("dino-train", ["--warmup_epochs", "-1"], ["--warmup_epochs", "-1"]),
    ("dino-train", ["--local_crops_number", "-1"], ["--local_crops_number", "-1"]),
    ("dino-train", ["--global_crops_scale", "0.4"], ["--global_crops_scale", "0.4"]),
    ("dino-train", ["--local_crops_scale", "0.4", "0.05"], ["--local_crops_scale", "0.4 0.05"]),
    ("dino-train", ["--global_crops_scale", "0", "1"], ["--global_crops_scale", "0.0 1.0"]),
    ("dino-train", ["--global_crop_size", "0"], ["--global_crop_size", "0"]),
    ("dino-train", ["--grad_accum_steps", "0"], ["--grad_accum_steps", "0"]),
    ("dino-train", ["--patch_size", "0"], ["--patch_size", "0"]),
    ("dino-train", ["--time_budget_min", "-1"], ["--time_budget_min", "-1"]),
    ("dino-train", ["--output_dir", FILE], ["--output_dir", FILE]),
    ("dino-train", ["--dataset", "imagefolder", "--data_path", "/no/such/dir", "--augment", "per_image"],
     ["--data_path", "/no/such/dir"]),
    ("dino-train", ["--device", "nonsense"], ["--device", "nonsense"]),
    ("dino-train", ["--arch", "no_such_net"], ["--arch", "no_such_net"]),
    ("dino-eval-knn", ["--temperature", "0"], ["--temperature", "0"]),
    ("dino-eval-knn", ["--nb_knn", "10", "0"], ["--nb_knn", "10 0"]),
    ("dino-eval-knn", ["--pretrained_weights", "/no/such.pth"], ["--pretrained_weights", "/no/such.pth"]),
    ("dino-eval-knn", ["--pretrained_weights", DIR], ["--pretrained_weights", DIR]),
    ("dino-eval-knn", ["--load_features", "/no/such/dir"], ["--load_features", "/no/such/dir"]),
    ("dino-eval-knn", ["--batch_size_per_gpu", "0"], ["--batch_size_per_gpu", "0"]),
    ("dino-eval-knn", ["--patch_size", "-8"], ["--patch_size", "-8"]),
    ("dino-eval-knn", ["--data_path", "/no/such/dir"], ["--data_path", "/no/such/dir"]),
    ("dino-eval-knn", ["--chunk_size", "0"], ["--chunk_size", "0"]),
    ("dino-eval-knn", ["--subset", "0"], ["--subset", "0"]),
    ("dino-eval-knn", ["--num_workers", "-1"], ["--num_workers", "-1"]),
    ("dino-eval-linear", ["--lr", "-0.01"], ["--lr", "-0.01"]),
    ("dino-eval-linear", ["--epochs", "0"], ["--epochs", "0"]),
    ("dino-eval-linear", ["--output_dir", FILE], ["--output_dir", FILE]),
    ("dino-eval-linear", ["--n_last_blocks", "0"], ["--n_last_blocks", "0"]),
    ("dino-eval-linear", ["--num_labels", "0"], ["--num_labels", "0"]),
    ("dino-eval-linear", ["--val_freq", "0"], ["--val_freq", "0"]),
    ("dino-visualize-attention", ["--fashion_mnist_index", "0", "--patch_size", "0"], ["--patch_size", "0"]),
    ("dino-visualize-attention", ["--image_path", "/no/such.png"], ["--image_path", "/no/such.png"]),
    ("dino-visualize-attention", ["--fashion_mnist_index", "0", "--threshold", "2"], ["--threshold", "2"]),
    ("dino-visualize-attention", ["--fashion_mnist_index", "0", "--output_dir", FILE], ["--output_dir", FILE]),
    ("dino-visualize-attention", ["--fashion_mnist_index", "0", "--image_size", "0", "28"], ["--image_size", "0 28"]),
    ("dino-visualize-attention", ["--fashion_mnist_index", "-1"], ["--fashion_mnist_index", "-1"]),
    ("dino-visualize-attention", ["--fashion_mnist_index", "0", "--pretrained_weights", "/no/such.pth"],
     ["--pretrained_weights", "/no/such.pth"]),
    ("dino-plot-curves", ["/no/such.jsonl", "out.png"], ["log", "/no/such.jsonl"]),
    ("dino-plot-curves", [FILE, DIR], ["out_png", DIR]),
]


def run_main(program, argv, capsys):
    with pytest.raises(SystemExit) as info:
        PROGRAMS[program](argv)
    return info.value.code, capsys.readouterr().err.strip()


def _substitute(items, file, folder):
    return [item.replace(FILE, str(file)).replace(DIR, str(folder)) for item in items]


@pytest.mark.parametrize("program, argv, words", PROGRAM_CASES,
                         ids=[f"{p}{''.join(a[:1])}{i}" for i, (p, a, _) in enumerate(PROGRAM_CASES)])
def test_program(tmp_path, capsys, monkeypatch, program, argv, words):
    monkeypatch.chdir(tmp_path)
    afile = tmp_path / "a_file"
    afile.write_text('{"step": 1, "train_loss": 1.0}\n')
    argv = _substitute(argv, afile, tmp_path)
    if program == "dino-train":
        argv = [*TRAIN, "--output_dir", str(tmp_path / "run"), *argv]
    code, err = run_main(program, argv, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"{program}: error: "), err
    for word in _substitute(words, afile, tmp_path):
        assert word in err, err
    assert "nepochs" not in err


def test_program_argparse_errors_keep_their_usage_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were the error missed, the maps would be written here
    code, err = run_main("dino-visualize-attention", ["--threshold", "abc", "--fashion_mnist_index", "0"], capsys)
    assert code == 2 and err.startswith("usage:") and "argument --threshold: invalid float value: 'abc'" in err


@pytest.mark.parametrize("program", ["dino-eval-knn", "dino-eval-linear", "dino-visualize-attention"])
def test_program_one_trust_flag_name(tmp_path, capsys, monkeypatch, program):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        PROGRAMS[program](["--help"])
    help_text = capsys.readouterr().out
    assert "--trusted_checkpoint" in help_text and "--trusted " not in help_text and "--trusted," not in help_text


@pytest.mark.parametrize("how", ["flag", "env"])
def test_program_traceback_only_on_request(tmp_path, capsys, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    argv = [*TRAIN, "--lr", "-1"] + (["--debug"] if how == "flag" else [])
    if how == "env":
        monkeypatch.setenv("DINO_PYTORCH_DEBUG", "1")
    code, err = run_main("dino-train", argv, capsys)
    assert code == 2 and "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith(
        "dino-train: error: --lr -1")


def test_program_resume_of_another_width(tmp_path, capsys):
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train.main([*TRAIN, "--output_dir", str(out)]) == 0
    assert os.path.exists(out / "checkpoint.pth")
    capsys.readouterr()
    code, err = run_main("dino-train", [*TRAIN, "--output_dir", str(out), "--width", "8"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--output_dir" in err and "shape mismatch" in err and "start afresh" in err


def test_check_resume_fits_names_the_mismatch(tmp_path):
    """The helper the xfail above asks dino-train's resume() to call."""
    from dino_pytorch.cli._setup import UsageError
    from dino_pytorch.cli.train_flags import check_resume_fits

    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, small_dino().official_checkpoint(None, 1))
    check_resume_fits(load_checkpoint(path), small_dino().student, path)  # the same network: fine
    wider = DINO(ConvNet(in_chans=1, width=8), out_dim=16, hidden_dim=16, bottleneck_dim=8, input_size=(1, 28, 28))
    with pytest.raises(UsageError, match=r"shape mismatch.*--output_dir.*start afresh"):
        check_resume_fits(load_checkpoint(path), wider.student, path)
