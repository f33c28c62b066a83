"""Promotion closes the loop: when a person moves `champion` in the MLflow UI, the next pending
request starts at once instead of at the next cron.

A small HTTP endpoint receives MLflow's `model_version_alias.created` webhook, checks its
signature (`cul.io.webhooks`), and for `champion` on our registered model starts a run of the
continual flow's deployment (the dispatcher), keyed by the delivery so a retried delivery starts
nothing twice. Run it with `cul hooks serve`; register it in MLflow with `cul hooks install URL`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cul.io.tracking import CHAMPION
from cul.io.webhooks import WebhookRejected, alias_event, verify

log = logging.getLogger("cul.promotion")


def create_app(model: str, deployment: str, secret: str, alias: str = CHAMPION) -> FastAPI:
    """The receiver: `POST /mlflow` (the webhook's URL) and `GET /health`.

    Args:
        model: the registered model whose promotions start the next request.
        deployment: FLOW/DEPLOYMENT to run on a promotion (the dispatcher, `cul-continual/dispatch`).
        secret: the webhook's secret, the same given to MLflow (`CUL_WEBHOOK_SECRET`).
        alias: the alias that means "promoted".
    """
    if not secret:
        raise ValueError(
            "the receiver needs the webhook's secret (CUL_WEBHOOK_SECRET): unsigned deliveries are refused"
        )
    app = FastAPI(title="cul promotion hook")

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True, "model": model, "starts": deployment}

    @app.post("/mlflow")
    async def mlflow_event(request: Request) -> JSONResponse:
        from prefect.deployments import arun_deployment

        body = await request.body()
        try:
            event = alias_event(verify(request.headers, body, secret))
        except (WebhookRejected, KeyError, ValueError) as e:
            log.warning("refused a delivery: %s", e)
            return JSONResponse({"refused": str(e)}, status_code=401)
        if event is None or event.alias != alias or event.name != model:
            return JSONResponse({"ignored": "not a promotion of " + model})
        run = await arun_deployment(
            deployment, timeout=0, as_subflow=False, idempotency_key=f"promotion/{model}/{event.delivery}"
        )
        log.info("%s version %s promoted: started %s (%s)", model, event.version, run.name, run.id)
        return JSONResponse({"flow_run": str(run.id), "name": run.name, "version": event.version}, status_code=202)

    return app


def serve(model: str, deployment: str, secret: str, host: str = "0.0.0.0", port: int = 8090) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app(model, deployment, secret), host=host, port=port, log_level="warning")
