"""nodes.diffusion.model_code: an SD load imports its network classes without diffusers' other model families,
and code that asks for a whole family package still gets it. Each check runs in a fresh interpreter (what is
imported is process state)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def fresh_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_loading_a_checkpoint_leaves_other_model_families_unimported():
    found = fresh_python("""
import json, sys
from latentloom.nodes.diffusion.checkpoint import load_checkpoint
loaded = load_checkpoint("models/checkpoints/toy-shapes.safetensors")
print(json.dumps({
    "unet": type(loaded.model.unet).__name__, "vae": type(loaded.vae.autoencoder).__name__,
    "flux": "diffusers.models.transformers.transformer_flux" in sys.modules,
    "wan_vae": "diffusers.models.autoencoders.autoencoder_kl_wan" in sys.modules,
    "unet_1d": "diffusers.models.unets.unet_1d" in sys.modules}))
""")
    assert found == {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "flux": False, "wan_vae": False,
                     "unet_1d": False}


def test_a_family_package_still_gives_every_model_on_first_use():
    found = fresh_python("""
import json
from latentloom.nodes.diffusion import model_code
unet_class = model_code.unet_class()
from diffusers.models.transformers import FluxTransformer2DModel
from diffusers.models.unets import UNet2DConditionModel, UNet1DModel
from diffusers import ControlNetModel, UNet2DConditionModel as TopLevel
print(json.dumps({"flux": FluxTransformer2DModel.__name__, "unet_1d": UNet1DModel.__name__,
                  "same_unet": unet_class is UNet2DConditionModel is TopLevel,
                  "controlnet": ControlNetModel.__name__}))
""")
    assert found == {"flux": "FluxTransformer2DModel", "unet_1d": "UNet1DModel", "same_unet": True,
                     "controlnet": "ControlNetModel"}


def test_attention_processors_answer_inspect_from_a_precomputed_signature():
    # diffusers' Attention.forward inspects its processor's __call__ at every call; after a load each processor
    # class carries its signature, and it is the one inspect computes from the code.
    found = fresh_python("""
import inspect, json, types
from latentloom.nodes.diffusion.checkpoint import load_checkpoint
loaded = load_checkpoint("models/checkpoints/toy-shapes.safetensors")
networks = (loaded.model.unet, loaded.vae.autoencoder)
calls = {type(m.processor).__call__ for net in networks for m in net.modules() if hasattr(m, "processor")}
def computed(call):
    plain = types.FunctionType(call.__code__, call.__globals__, call.__name__, call.__defaults__, call.__closure__)
    plain.__kwdefaults__, plain.__annotations__ = call.__kwdefaults__, call.__annotations__
    return str(inspect.signature(plain))
print(json.dumps({"processors": sorted(call.__qualname__ for call in calls),
                  "signed": all("__signature__" in call.__dict__ for call in calls),
                  "same": all(str(inspect.signature(call)) == computed(call) for call in calls)}))
""")
    assert found == {"processors": ["AttnProcessor2_0.__call__"], "signed": True, "same": True}
