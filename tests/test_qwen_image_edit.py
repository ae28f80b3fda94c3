"""Qwen-Image Edit with images on tiny random-weight files in ComfyUI's layouts: the Qwen2.5-VL vision tower,
ComfyUI's preprocessing / splicing / multimodal rotary positions, the Edit and Edit Plus nodes, compared with
diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline built from the same weights.

Where ComfyUI 0.3.64 and diffusers differ by design, the test compares what is the same by construction and
writes ComfyUI's formula out for the rest:
* image sizes: ComfyUI area-resizes (sides rounded; Plus references to multiples of 8) and then bilinearly resizes
  to multiples of 28 for the vision tower; diffusers resizes to multiples of 32 and its processor resizes
  bicubically. Images already at a multiple of 28 go through both unchanged, so those are compared directly;
* token order: ComfyUI does not undo the vision tower's window permutation (transformers does), so images over
  112 pixels wide or tall give the language model the same vision tokens in window order;
* rotary positions: diffusers 0.42.1 calls the text encoder without the processor's `mm_token_type_ids`, which
  transformers 5 needs to compute the multimodal (M-RoPE) positions; without them it silently uses 1D positions for
  the vision tokens. ComfyUI (and the Qwen2.5-VL reference) use M-RoPE, so the pipeline is compared with its text
  encoder given the processor's token types (`_with_token_types`), and shown to differ without them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from node_context import StubContext, make_env, run_node  # noqa: E402
from qwen_image_support import (  # noqa: E402
    qwen_text_original,
    tiny_qwen_text_encoder,
    tiny_qwen_transformer,
    tiny_qwen_vae,
    tokenizer_vocab_size,
    vision_token_ids,
    wan_vae_original,
    write_tiny_tokenizer,
)
from tiny_models import save_state  # noqa: E402

from latentloom.engine.inputs import InputError  # noqa: E402
from latentloom.nodes.diffusion import dit_qwen_image, qwen_vision  # noqa: E402
from latentloom.nodes.diffusion.latent_formats import WAN21_LATENT  # noqa: E402
from latentloom.nodes.diffusion.qwen_text import EDIT_TEMPLATE, PICTURE_PROMPT, VISION_KEY  # noqa: E402
from latentloom.nodes.family_qwen_image import TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus  # noqa: E402
from latentloom.nodes.loaders import CLIPLoader, UNETLoader, VAELoader  # noqa: E402

pytestmark = pytest.mark.slow  # tiny Qwen2.5-VL text and vision models compared with the pipelines

PROMPT = "a photo of a cat"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class Tiny:
    def __init__(self, models: Path):
        self.models = models
        self.tokenizer_dir = write_tiny_tokenizer(models / "text_encoders" / "qwen25_tokenizer")
        self.text_encoder = tiny_qwen_text_encoder(tokenizer_vocab_size(self.tokenizer_dir), 41,
                                                   vision_token_ids(self.tokenizer_dir))
        self.transformer = tiny_qwen_transformer(42)
        self.vae = tiny_qwen_vae(43)
        save_state(qwen_text_original(self.text_encoder), models / "text_encoders" / "qwen_2.5_vl_7b.safetensors")
        save_state(self.transformer.state_dict(), models / "diffusion_models" / "qwen_image_edit.safetensors")
        save_state(wan_vae_original(self.vae), models / "vae" / "qwen_image_vae.safetensors")

    def processor(self):
        from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        tokenizer = Qwen2Tokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)
        # Qwen2.5-VL's preprocessor settings (Qwen-Image-Edit's processor folder), given explicitly.
        images = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                       merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
        return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())

    def pipeline(self, plus: bool = False):
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline

        processor = self.processor()
        kind = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
        return kind(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0), vae=self.vae,
                    text_encoder=self.text_encoder, tokenizer=processor.tokenizer, processor=processor,
                    transformer=self.transformer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("qwen_edit") / "models")


@pytest.fixture
def ctx(tiny) -> StubContext:
    return StubContext(make_env(models_dir=tiny.models))


@pytest.fixture
def clip(ctx):
    return run_node(CLIPLoader, ctx, clip_name="qwen_2.5_vl_7b.safetensors", type="qwen_image")[0]


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    """An IMAGE [1, H, W, 3] of 8-bit values, so a PIL copy holds exactly the same pixels."""
    values = torch.randint(0, 256, (1, height, width, 3), generator=torch.Generator().manual_seed(seed))
    return values.float() / 255


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy())


@contextlib.contextmanager
def _with_token_types(text_encoder):
    """The pipeline's text encoder called with mm_token_type_ids as Qwen2VLProcessor makes them (1 on image
    tokens), so transformers computes Qwen2.5-VL's multimodal positions."""
    forward = text_encoder.forward
    image_token = text_encoder.config.image_token_id

    def with_types(input_ids=None, **kwargs):
        return forward(input_ids=input_ids, mm_token_type_ids=(input_ids == image_token).int(), **kwargs)

    text_encoder.forward = with_types
    try:
        yield
    finally:
        del text_encoder.forward


def _comfy_window_order(grid_h: int, grid_w: int) -> torch.Tensor:
    """ComfyUI's window order, written as a sort: by 4x4 window of merged tokens (row-major), then inside it."""
    rows, cols = grid_h // 2, grid_w // 2
    keys = sorted(range(rows * cols), key=lambda i: ((i // cols) // 4, (i % cols) // 4, i // cols, i % cols))
    return torch.tensor(keys)


def test_preprocessing_and_sizes_follow_qwen2vl(tiny):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for height, width in ((84, 56), (793, 1322), (20, 30), (4000, 4000), (1024, 1024)):
        assert qwen_vision.resized_side_lengths(height, width) == smart_resize(height, width, 28, 3136, 12845056)
    image = _image(84, 112, 1)  # multiples of 28: the processor's resize changes nothing
    patches, grid = qwen_vision.image_patches(image)
    expected = tiny.processor().image_processor(images=_pil(image), return_tensors="pt")
    assert grid == (6, 8) and expected["image_grid_thw"].tolist() == [[1, 6, 8]]
    difference = (patches - expected["pixel_values"]).abs().max().item()
    print(f"vision patches max |diff| = {difference:.3g}")
    assert difference <= 1e-5


def test_vision_tower_and_rotary_positions_follow_comfyui(tiny, clip):
    assert clip.has_vision
    visual = clip.encoders[VISION_KEY]
    assert visual.config.num_heads == 16 and visual.config.depth == 8 and visual.config.out_hidden_size == 256
    image = _image(168, 224, 2)  # 12 x 16 patches, 6 x 8 merged tokens: four windows
    patches, (grid_h, grid_w) = qwen_vision.image_patches(image)
    grid = torch.tensor([[1, grid_h, grid_w]])
    with torch.no_grad():
        raster = tiny.text_encoder.model.visual(patches, grid_thw=grid).pooler_output
        ours, _ = qwen_vision.encode_image(visual, image)
    assert qwen_vision.window_order(grid_h, grid_w).tolist() == _comfy_window_order(grid_h, grid_w).tolist()
    difference = (ours - raster[_comfy_window_order(grid_h, grid_w)]).abs().max().item()
    print(f"vision tokens (ComfyUI's window order) max |diff| = {difference:.3g}")
    assert difference <= 1e-5 and (ours - raster).abs().max() > 1e-3  # the order really differs

    # M-RoPE: two pictures in one prompt, positions as transformers' get_rope_index gives them.
    processor = tiny.processor()
    text = EDIT_TEMPLATE.format(PICTURE_PROMPT.format(1) + PICTURE_PROMPT.format(2) + PROMPT)
    inputs = processor(text=[text], images=[_pil(_image(56, 84, 3)), _pil(_image(112, 56, 4))], return_tensors="pt")
    ids = inputs["input_ids"][0]
    expected, _ = tiny.text_encoder.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    spans, index = [], 0
    for grid_thw in inputs["image_grid_thw"].tolist():
        start = next(i for i in range(index, len(ids)) if ids[i] == pad)
        size = grid_thw[1] * grid_thw[2] // 4
        spans.append(qwen_vision.VisionSpan(start, size, grid_thw[1], grid_thw[2]))
        index = start + size
    torch.testing.assert_close(qwen_vision.rope_positions(len(ids), spans), expected[:, 0], rtol=0, atol=0)


def test_edit_encoding_matches_the_pipeline(tiny, clip):
    image = _image(84, 56, 5)  # one window, a multiple of 28: the same pixels and token order as diffusers
    tokens = clip.tokenize(PROMPT, images=[image])
    assert tokens["template_end"] == 64  # diffusers' prompt_template_encode_start_idx for the edit template
    ours, _ = clip.encode_tokens(tokens)
    pipeline = tiny.pipeline()
    with torch.no_grad(), _with_token_types(tiny.text_encoder):
        expected, mask = pipeline.encode_prompt(PROMPT, image=_pil(image), device=torch.device("cpu"))
    with torch.no_grad():
        one_dimensional, _ = pipeline.encode_prompt(PROMPT, image=_pil(image), device=torch.device("cpu"))
    assert mask is None and ours.shape == expected.shape  # 6 merged vision tokens in place of <|image_pad|>
    difference = (ours - expected).abs().max().item()
    print(f"Qwen-Image Edit text+image encoding max |diff| = {difference:.3g} "
          f"(pipeline as shipped, 1D positions: {(ours - one_dimensional).abs().max().item():.3g})")
    assert difference <= 1e-4 and expected.abs().max() > 0.1
    assert (ours - one_dimensional).abs().max() > 1e-3
    text_only, _ = clip.encode_tokens(clip.tokenize(PROMPT))
    assert ours.shape[1] == text_only.shape[1] + 3 - 1 + 6  # the vision markers, <|image_pad|> -> 6 tokens


def test_edit_plus_encoding_matches_the_pipeline(tiny, clip):
    first, second = _image(56, 84, 6), _image(112, 56, 7)
    pictures = PICTURE_PROMPT.format(1) + PICTURE_PROMPT.format(2)
    ours, _ = clip.encode_tokens(clip.tokenize(pictures + PROMPT, images=[first, second],
                                               llama_template=EDIT_TEMPLATE))
    with torch.no_grad(), _with_token_types(tiny.text_encoder):
        expected, _ = tiny.pipeline(plus=True).encode_prompt(PROMPT, image=[_pil(first), _pil(second)],
                                                             device=torch.device("cpu"))
    difference = (ours - expected).abs().max().item()
    print(f"Qwen-Image Edit Plus encoding (two pictures) max |diff| = {difference:.3g}")
    assert ours.shape == expected.shape and difference <= 1e-4


def test_large_pictures_reach_the_language_model_in_window_order(tiny, clip):
    """Over 112 pixels ComfyUI's token order differs from diffusers': ComfyUI's formula written out with
    transformers' pieces (vision tower, get_rope_index, language model)."""
    image = _image(168, 224, 8)
    pictures = PICTURE_PROMPT.format(1)
    ours, _ = clip.encode_tokens(clip.tokenize(pictures + PROMPT, images=[image], llama_template=EDIT_TEMPLATE))
    processor = tiny.processor()
    inputs = processor(text=[EDIT_TEMPLATE.format(pictures + PROMPT)], images=[_pil(image)], return_tensors="pt")
    model = tiny.text_encoder.model
    with torch.no_grad():
        vision = model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        slots = inputs["input_ids"][0] == model.config.image_token_id
        embeds[0, slots] = vision[_comfy_window_order(12, 16)]
        positions, _ = model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"])
        hidden = model.language_model(inputs_embeds=embeds, position_ids=positions,
                                      attention_mask=inputs["attention_mask"]).last_hidden_state[:, 64:]
    with torch.no_grad(), _with_token_types(tiny.text_encoder):
        diffusers_order, _ = tiny.pipeline(plus=True).encode_prompt(PROMPT, image=[_pil(image)],
                                                                    device=torch.device("cpu"))
    difference = (ours - hidden).abs().max().item()
    print(f"window-order encoding max |diff| = {difference:.3g}")
    assert difference <= 1e-4 and (ours - diffusers_order).abs().max() > 1e-3


def _comfy_scaled_size(height: int, width: int, area: int, multiple: int | None = None) -> tuple[int, int]:
    scale = math.sqrt(area / (height * width))
    if multiple is None:
        return round(height * scale), round(width * scale)
    return round(height * scale / multiple) * multiple, round(width * scale / multiple) * multiple


@pytest.mark.slow
def test_edit_nodes_encode_pictures_and_reference_latents(tiny, ctx, clip):
    (vae,) = run_node(VAELoader, ctx, vae_name="qwen_image_vae.safetensors")
    image = _image(30, 50, 9)
    (edit,) = run_node(TextEncodeQwenImageEdit, ctx, clip=clip, prompt=PROMPT, vae=vae, image=image)
    height, width = _comfy_scaled_size(30, 50, 1024 * 1024)  # 793 x 1322
    (reference,) = edit[0][1]["reference_latents"]
    assert reference.shape == (1, 16, height // 8, width // 8)
    vision_tokens = qwen_vision.merged_token_count(height, width)
    text, _ = clip.encode_tokens(clip.tokenize(PROMPT))
    # The edit template's head (64) is cut instead of the plain one's (34); its 3 vision markers stay.
    assert edit[0][0].shape[1] == text.shape[1] + 3 - 1 + vision_tokens
    (without_vae,) = run_node(TextEncodeQwenImageEdit, ctx, clip=clip, prompt=PROMPT, image=image)
    assert "reference_latents" not in without_vae[0][1]
    torch.testing.assert_close(without_vae[0][0], edit[0][0], rtol=0, atol=0)

    (plus,) = run_node(TextEncodeQwenImageEditPlus, ctx, clip=clip, prompt=PROMPT, vae=vae, image1=image,
                       image3=_image(40, 40, 10))
    references = plus[0][1]["reference_latents"]
    sizes = [_comfy_scaled_size(30, 50, 1024 * 1024, 8), _comfy_scaled_size(40, 40, 1024 * 1024, 8)]
    assert [r.shape[-2:] for r in references] == [(h // 8, w // 8) for h, w in sizes]
    vision = [_comfy_scaled_size(30, 50, 384 * 384), _comfy_scaled_size(40, 40, 384 * 384)]
    expected, _ = clip.encode_tokens(clip.tokenize(
        PICTURE_PROMPT.format(1) + PICTURE_PROMPT.format(3) + PROMPT, llama_template=EDIT_TEMPLATE,
        images=[torch.nn.functional.interpolate(im.movedim(-1, 1), size=size, mode="area").movedim(1, -1)
                for im, size in ((image, vision[0]), (_image(40, 40, 10), vision[1]))]))
    torch.testing.assert_close(plus[0][0], expected, rtol=0, atol=0)


def test_edit_inputs_are_checked(tiny, ctx, clip, tmp_path):
    with pytest.raises(InputError, match=r"TextEncodeQwenImageEdit.*'image'.*IMAGE"):
        run_node(TextEncodeQwenImageEdit, ctx, clip=clip, prompt=PROMPT, image=torch.rand(32, 32))
    text_only = {k: v for k, v in qwen_text_original(tiny.text_encoder).items() if not k.startswith("visual.")}
    save_state(text_only, tmp_path / "models" / "text_encoders" / "qwen_text_only.safetensors")
    other = StubContext(make_env(models_dir=tmp_path / "models"))
    (lonely,) = run_node(CLIPLoader, other, clip_name="qwen_text_only.safetensors", type="qwen_image")
    assert not lonely.has_vision
    with pytest.raises(InputError, match=r"'image2'.*no vision tower"):
        run_node(TextEncodeQwenImageEditPlus, other, clip=lonely, prompt=PROMPT, image2=_image(32, 32, 1))


def _aura_sigmas(steps: int, shift: float) -> list[float]:
    """ComfyUI's "simple" schedule on ModelSamplingAuraFlow."""
    table = [shift * (i / 1000) / (1 + (shift - 1) * (i / 1000)) for i in range(1, 1001)]
    return [table[-(1 + int(i * 1000 / steps))] for i in range(steps)] + [0.0]


@pytest.mark.slow
def test_ksampler_edit_matches_the_pipeline(tiny, ctx, clip):
    """A 1024 x 1024 picture: ComfyUI's and diffusers' resizes both keep it, so the reference latent and the
    rotary layout agree; the prompt embeddings are ours (their difference from diffusers' is the resize to
    multiples of 28 and the window order, compared above)."""
    from latentloom.nodes.model_families import EmptySD3LatentImage, ModelSamplingAuraFlow
    from latentloom.nodes.sampling import KSampler

    (model,) = run_node(UNETLoader, ctx, unet_name="qwen_image_edit.safetensors", weight_dtype="default")
    (vae,) = run_node(VAELoader, ctx, vae_name="qwen_image_vae.safetensors")
    (model,) = run_node(ModelSamplingAuraFlow, ctx, model=model, shift=3.1)
    image = torch.nn.functional.interpolate(_image(32, 32, 11).movedim(-1, 1), size=(1024, 1024),
                                            mode="nearest").movedim(1, -1)
    (positive,) = run_node(TextEncodeQwenImageEdit, ctx, clip=clip, prompt=PROMPT, vae=vae, image=image)
    (latent,) = run_node(EmptySD3LatentImage, ctx, width=1024, height=1024, batch_size=1)
    steps, seed = 2, 3
    (sampled,) = run_node(KSampler, ctx, model=model, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
                          scheduler="simple", positive=positive, negative=positive, latent_image=latent, denoise=1.0)
    noise = torch.randn((1, 16, 128, 128), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        packed = tiny.pipeline()(image=_pil(image), prompt_embeds=positive[0][0], height=1024, width=1024,
                                 num_inference_steps=steps, sigmas=_aura_sigmas(steps, 3.1)[:-1],
                                 latents=dit_qwen_image.pack(noise), true_cfg_scale=1.0, output_type="latent",
                                 return_dict=False)[0]
    expected = dit_qwen_image.unpack(packed, 16, 128, 128)
    difference = (WAN21_LATENT.process_in(sampled["samples"]) - expected).abs().max().item()
    print(f"Qwen-Image Edit final latents max |diff| = {difference:.3g}")
    assert difference <= 1e-4 and (expected - noise).abs().max() > 0.1


@pytest.mark.slow
def test_qwen_image_edit_workflow_runs_through_the_cli(tiny, tmp_path, capsys):
    from latentloom.server.cli import main

    (tmp_path / "input").mkdir()
    _pil(_image(24, 40, 12)).save(tmp_path / "input" / "source.png")
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "qwen_image_edit.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_2.5_vl_7b.safetensors", "type": "qwen_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "source.png"}},
        "5": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.1}},
        "6": {"class_type": "TextEncodeQwenImageEditPlus",
              "inputs": {"clip": ["2", 0], "prompt": PROMPT, "vae": ["3", 0], "image1": ["4", 0]}},
        "7": {"class_type": "TextEncodeQwenImageEditPlus", "inputs": {"clip": ["2", 0], "prompt": ""}},
        "8": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 1, "steps": 2, "cfg": 2.5,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["3", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "qwen_edit"}},
    }
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    code = main(["run", str(tmp_path / "graph.json"), "--json", "--models-dir", str(tiny.models),
                 "--input-dir", str(tmp_path / "input"), "--output-dir", str(tmp_path / "output"),
                 "--temp-dir", str(tmp_path / "temp"), "--custom-nodes", str(tmp_path / "none")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success", summary
    saved = list((tmp_path / "output").glob("qwen_edit*.png"))
    from PIL import Image

    assert len(saved) == 1 and Image.open(saved[0]).size == (64, 48)
