"""The registered model's code (MLflow "models from code"): a pyfunc that generates images from
prompts with the weights logged beside it as the `weights` artifact (safetensors)."""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class WorldModelPyfunc(PythonModel):
    """Input: a DataFrame with a `prompt` column (optional `seed`). Output: the prompts with a
    base64 PNG each."""

    def load_context(self, context) -> None:
        from cul.models import load_model

        self.model = load_model(context.artifacts["weights"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from PIL import Image

        from cul.plots import to_uint8

        seed = int(model_input["seed"].iloc[0]) if "seed" in model_input else 0
        images = to_uint8(self.model.sample(list(model_input["prompt"]), seed=seed))
        out = model_input[["prompt"]].copy()
        pngs = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            pngs.append(base64.b64encode(buf.getvalue()).decode())
        out["png_base64"] = pngs
        return out


mlflow.models.set_model(WorldModelPyfunc())
