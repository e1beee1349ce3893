"""Q-VLM Studio: ``python app.py [--host H] [--port P]`` (or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT).

Kept thin on purpose (Hugging Face Spaces runs this file); everything lives in ``qvlm.ui``.
"""

from __future__ import annotations

import argparse
import os

from qvlm.ui import Settings, build_app
from qvlm.ui.state import remove_stale_session_folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--model", default=None, help="default model (else QVLM_DEFAULT_MODEL or the bundled one)")
    args = parser.parse_args()
    settings = Settings.from_env(default_model=args.model)
    remove_stale_session_folders()  # a killed server's sessions never ended: their download folders go now
    build_app(settings).queue(default_concurrency_limit=settings.concurrency).launch(
        server_name=args.host, server_port=args.port,
        max_file_size="20mb",  # uploads are images; refuse huge files early
    )


if __name__ == "__main__":
    main()
