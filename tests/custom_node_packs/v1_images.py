"""A single-file V1 pack using ComfyUI's modules: folder_paths, nodes (core nodes the V1 way), comfy.utils."""

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import node_helpers
import torch

import nodes

folder_paths.add_model_folder_path("pack_things", folder_paths.models_dir + "/pack_things")


class PackInvertAndSave:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",),
                             "filename_prefix": ("STRING", {"default": "pack"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "pack/images"

    def run(self, images, filename_prefix, prompt=None, extra_pnginfo=None):
        progress = comfy.utils.ProgressBar(2)
        (inverted,) = nodes.ImageInvert().invert(images)
        progress.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()
        saved = nodes.SaveImage().save_images(inverted, filename_prefix, prompt, extra_pnginfo)
        progress.update(1)
        return {"ui": saved["ui"], "result": (inverted,)}


class PackSolid:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 8, "min": 1, "max": nodes.MAX_RESOLUTION}),
                             "height": ("INT", {"default": 8, "min": 1, "max": nodes.MAX_RESOLUTION}),
                             "level": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "pack/images"

    def make(self, width, height, level):
        image = torch.full((1, height, width, 3), level)
        return (comfy.utils.common_upscale(image.movedim(-1, 1), width * 2, height * 2, "nearest-exact",
                                           "disabled").movedim(1, -1),)


class PackModelFiles:
    """Lists model files the way loader packs do (combo of a folder's files, full path lookups)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),),
                             "sampler": (comfy.samplers.KSampler.SAMPLERS,)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "describe"
    CATEGORY = "pack/files"

    def describe(self, ckpt_name, sampler):
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        things = folder_paths.get_filename_list("pack_things")
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path("sub/pic", folder_paths
                                                                               .get_output_directory())
        cond = node_helpers.conditioning_set_values([[torch.zeros(1), {"a": 1}]], {"a": 2}, append=True)
        return (f"{path}|{','.join(things)}|{name}|{counter}|{subfolder}|{sampler}|{cond[0][1]['a']}",)


class PackSlowCount:
    """A long loop that checks for interrupts the way sampler packs do."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 100, "min": 1, "max": 10000})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "count"
    CATEGORY = "pack/images"

    def count(self, steps):
        import time

        for _ in range(steps):
            time.sleep(0.01)
            comfy.model_management.throw_exception_if_processing_interrupted()
        return (steps,)


NODE_CLASS_MAPPINGS = {"PackInvertAndSave": PackInvertAndSave, "PackSolid": PackSolid,
                       "PackModelFiles": PackModelFiles, "PackSlowCount": PackSlowCount}
