"""The baseline: a plain FastAPI endpoint doing one eager PyTorch forward per request, as tutorials write it.

python benchmarks/plain_server.py CHECKPOINT --port 8001
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI, Request

from modelship.training.checkpoint import load_checkpoint
from modelship.training.models import build_model


def make_app(checkpoint: str) -> FastAPI:
    ckpt = load_checkpoint(__import__("pathlib").Path(checkpoint))
    model = build_model(ckpt["model"]["arch"], ckpt["model"]["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    classes = ckpt["data"]["classes"]
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        body = await request.json()
        x = torch.tensor(body["inputs"], dtype=torch.float32).unsqueeze(0)
        with torch.no_grad():
            p = model(x).softmax(1)[0]
        i = int(p.argmax())
        return {"label": classes[i], "index": i, "score": float(p[i])}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(make_app(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
