"""A V1 pack with HTTP routes and websocket messages through PromptServer."""

from aiohttp import web

from server import PromptServer

routes = PromptServer.instance.routes


@routes.get("/v1_routes/hello/{name}")
async def hello(request):
    return web.json_response({"hello": request.match_info["name"], "times": int(request.rel_url.query.get("n", 1))})


@routes.post("/v1_routes/echo")
async def echo(request):
    body = await request.json()
    return web.json_response({"echo": body}, status=201)


class PackNotify:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"message": ("STRING", {"default": "hi"})}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "notify"
    CATEGORY = "pack/server"

    def notify(self, message, unique_id):
        PromptServer.instance.send_sync("v1_routes.message", {"message": message, "node": unique_id})
        PromptServer.instance.send_progress_text(f"said {message}", unique_id)
        return {"ui": {"text": [message]}}


NODE_CLASS_MAPPINGS = {"PackNotify": PackNotify}
