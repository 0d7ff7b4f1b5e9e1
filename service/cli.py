"""`raas-serve`: prepare the bundled model, or serve the gateway (and its engine).

Every option is also an environment variable (`RAAS_<OPTION>`, see service/server/settings.py);
a flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from raas_backend import policy_spec


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raas-serve",
        description="OpenAI-compatible gateway with per-request KV-cache budgets, in front "
        "of SGLang. Options default to RAAS_* environment variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = sub.add_parser(
        "prepare-model",
        help="convert the bundled SmolLM2-135M-Instruct once and print its directory",
    )
    prep.add_argument("--cache-dir", type=Path, default=None, help="default: $RAAS_CACHE_DIR")
    prep.add_argument("--force", action="store_true", help="convert again even if cached")

    serve = sub.add_parser(
        "serve",
        help="run the gateway; in embedded mode also start and supervise SGLang",
    )
    serve.add_argument("--host", help="gateway bind address (RAAS_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gateway port (RAAS_PORT, default 8000)")
    serve.add_argument(
        "--model-path",
        help="serve this model directory instead of the bundled one (RAAS_MODEL_PATH)",
    )
    serve.add_argument(
        "--model-name",
        help="model id clients send (RAAS_MODEL_NAME, default smollm2-135m-instruct)",
    )
    serve.add_argument(
        "--engine-mode",
        choices=["embedded", "remote"],
        help="start SGLang as a child (embedded, default) or use --engine-url (remote)",
    )
    serve.add_argument("--engine-url", help="remote SGLang base URL (RAAS_ENGINE_URL)")
    serve.add_argument(
        "--engine-port", type=int, help="embedded SGLang port (RAAS_ENGINE_PORT, default 30000)"
    )
    serve.add_argument(
        "--attention-backend",
        dest="engine_attention_backend",
        help="SGLang attention backend (RAAS_ENGINE_ATTENTION_BACKEND, default raas)",
    )
    serve.add_argument(
        "--drain-timeout-s",
        type=float,
        help="on SIGTERM, wait this long for in-flight requests (RAAS_DRAIN_TIMEOUT_S, default 30)",
    )
    serve.add_argument(
        "--kv-default-policy",
        choices=policy_spec.POLICY_NAMES,
        help="kv_policy of requests that name none (RAAS_KV_DEFAULT_POLICY, default raas)",
    )
    serve.add_argument(
        "--kv-default-budget-tokens",
        type=int,
        help="budget_tokens of requests that set none (RAAS_KV_DEFAULT_BUDGET_TOKENS, "
        f"default {policy_spec.DEFAULT_BUDGET_TOKENS})",
    )
    serve.add_argument(
        "--kv-max-budget-tokens",
        type=int,
        help="largest budget_tokens a request may ask for (RAAS_KV_MAX_BUDGET_TOKENS, "
        f"default {policy_spec.MAX_BUDGET_TOKENS})",
    )
    serve.add_argument("--api-keys-file", type=Path, help="API keys file (RAAS_API_KEYS_FILE)")
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="RAAS_LOG_LEVEL, default info",
    )
    return parser


def _prepare_model(args: argparse.Namespace) -> int:
    from service.engine.bundled_model import ModelPrepError, prepare_model

    try:
        prepared = prepare_model(args.cache_dir, force=args.force)
    except ModelPrepError as exc:
        print(f"raas-serve: {exc}", file=sys.stderr)
        return 1
    print(prepared.path)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.server.drain import DrainingServer
    from service.server.http_protocol import protocol_factory
    from service.server.log_config import configure_logging
    from service.server.settings import Settings

    overrides: dict[str, Any] = {
        name: value for name, value in vars(args).items() if name != "command" and value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"raas-serve: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)

    if settings.engine_mode == "embedded" and settings.model_path is None:
        from service.engine.bundled_model import ModelPrepError, prepare_model

        try:
            model_dir = prepare_model().path
        except ModelPrepError as exc:
            print(f"raas-serve: {exc}", file=sys.stderr)
            return 1
        settings = settings.model_copy(update={"model_path": str(model_dir)})

    from service.api.api_keys import ApiKeyError

    try:
        app = create_app(settings)
    except ApiKeyError as exc:
        print(f"raas-serve: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_factory(settings.http_header_timeout_s, settings.http_body_timeout_s),
        log_config=None,
        # service.server.http_metrics writes the access line, as structured JSON and cheaper.
        access_log=False,
        # The drain has already waited for in-flight requests; what is left after it (a
        # stream past the drain timeout) must not hold the engine's teardown hostage.
        timeout_graceful_shutdown=10,
    )
    DrainingServer(config, app, settings.drain_timeout_s).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "prepare-model":
        return _prepare_model(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
