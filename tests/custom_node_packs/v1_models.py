"""A V1 pack that works on MODEL / CLIP / VAE the ComfyUI way: ModelPatcher clone + in-place patches, CLIP
tokenize + encode_from_tokens, VAE encode / decode, and a patched model handed to nodes.common_ksampler."""

import nodes


class PackSelfAttentionScale:
    """Scales the self-attention values, as attention-tweaking packs do."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "pack/models"

    def patch(self, model, scale):
        def scale_values(q, k, v, extra_options):
            return q, k, v * scale

        m = model.clone()
        m.set_model_attn1_patch(scale_values)
        return (m,)


class PackModelFacts:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "facts"
    CATEGORY = "pack/models"

    def facts(self, model):
        sampling = model.get_model_object("model_sampling")
        patched = model.clone()
        patched.model_options.setdefault("transformer_options", {})["pack_flag"] = True
        leaked = "pack_flag" in model.model_options.get("transformer_options", {})
        return (f"{float(sampling.sigma_max):.3f}|{float(model.model.model_sampling.sigma_min):.4f}|"
                f"{model.model.latent_format.scale_factor}|{leaked}|"
                f"{patched.model_options['transformer_options']['pack_flag']}",)


class PackEncodeTokens:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"default": "a red square"}),
                             "scheduled": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "pack/models"

    def encode(self, clip, text, scheduled):
        tokens = clip.tokenize(text)
        if scheduled:
            return (clip.encode_from_tokens_scheduled(tokens),)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return ([[cond, {"pooled_output": pooled}]],)


class PackVAERoundTrip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",), "image": ("IMAGE",)}}

    RETURN_TYPES = ("LATENT", "IMAGE", "INT")
    FUNCTION = "round_trip"
    CATEGORY = "pack/models"

    def round_trip(self, vae, image):
        latent = vae.encode(image)
        return ({"samples": latent}, vae.decode(latent), vae.spacial_compression_encode())


class PackPatchedSampler:
    """Patches the model it is given and samples with ComfyUI's common_ksampler (euler / normal, cfg 5)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "latent_image": ("LATENT",), "seed": ("INT", {"default": 0}),
                             "steps": ("INT", {"default": 3}), "scale": ("FLOAT", {"default": 2.0})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "pack/models"

    def sample(self, model, positive, negative, latent_image, seed, steps, scale):
        (patched,) = PackSelfAttentionScale().patch(model, scale)
        return nodes.common_ksampler(patched, seed, steps, 5.0, "euler", "normal", positive, negative, latent_image)


NODE_CLASS_MAPPINGS = {"PackPatchedSampler": PackPatchedSampler, "PackSelfAttentionScale": PackSelfAttentionScale,
                       "PackModelFacts": PackModelFacts,
                       "PackEncodeTokens": PackEncodeTokens, "PackVAERoundTrip": PackVAERoundTrip}
