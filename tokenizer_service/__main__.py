"""`tokenizer-service` and `python -m tokenizer_service`: SIGTERM held from the first moment
(clients/stop_signals.py), then the service's imports and the service (tokenizer_service/server.py)."""

from __future__ import annotations


def main() -> None:
    from clients.stop_signals import hold

    hold()
    from tokenizer_service.server import main as serve

    serve()


if __name__ == "__main__":
    main()
