"""The plain pattern this service is compared with: one deployment, a blocking generate() per request.

    MODEL_ID=... serve run benchmarks.baseline_app:app

It mirrors the Ray Serve example the project grew from: the model loads in the constructor, and
each request runs ``model.generate`` inline in its handler, so one replica serves one request at
a time however many arrive. Benchmarks deploy it beside the service, on the same model.
(No ``from __future__ import annotations``: FastAPI must see the real ``Request`` type.)
"""

import os

from fastapi import FastAPI, Request
from ray import serve

api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class PlainGenerator:
    def __init__(self, model_id: str, num_threads: int = 1, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(num_threads)
        self.torch = torch
        self.device = device
        dtype = torch.bfloat16 if device == "cuda" else torch.float32  # what the service uses
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).to(device).eval()

    @api.post("/generate")
    async def generate(self, request: Request) -> dict:
        body = await request.json()
        kwargs = body.get("generation_kwargs", {})
        inputs = self.tokenizer(body["prompt"], return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=kwargs.get("max_new_tokens", 64),
                do_sample=kwargs.get("temperature", 0) > 0,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        new = output[0, inputs["input_ids"].shape[1] :]
        return {"completions": [self.tokenizer.decode(new, skip_special_tokens=True)], "tokens": int(new.shape[0])}


app = PlainGenerator.bind(os.environ.get("MODEL_ID", "models/pydoc-gpt-mini"))
