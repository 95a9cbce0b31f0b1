"""Screenshots of the Prefect UI for the README: the newest pipeline run's graph and its report.

    .venv/bin/python scripts/ui_screenshots.py [--state-dir DIR] [--out docs]

Needs a running, deployed stack with one completed `veiltrain run --deployed`, and Debian's
chromium (`apt-get install chromium`). Headless, loopback only, a throwaway browser profile.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from veiltrain import stack

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags chromium keeps dialling out, which this network refuses.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1000",
    "--virtual-time-budget=20000",
]


def _newest_run_and_report() -> tuple[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowFilter,
        FlowFilterName,
    )
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort

    with get_client(sync_client=True) as client:
        flows = FlowFilter(name=FlowFilterName(any_=["veiltrain-deployed"]))
        runs = client.read_flow_runs(flow_filter=flows, sort=FlowRunSort.START_TIME_DESC)
        done = [r for r in runs if r.state_name == "Completed"]
        keys = ArtifactFilter(key=ArtifactFilterKey(any_=["veiltrain-report"]))
        reports = client.read_artifacts(artifact_filter=keys, sort=ArtifactSort.CREATED_DESC)
    if not done or not reports:
        raise SystemExit("no completed pipeline run with a report: `veiltrain run --deployed`")
    return str(done[0].id), str(reports[0].id)


def _shoot(url: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="vt-chromium-") as profile:
        cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={target}", url]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    print(f"{target}  <-  {url}")


def main() -> None:
    """Take both screenshots."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args()
    st = stack.load(args.state_dir)
    os.environ["PREFECT_API_URL"] = st.api_url
    run_id, artifact_id = _newest_run_and_report()
    args.out.mkdir(exist_ok=True)
    _shoot(f"{st.ui_url}/runs/flow-run/{run_id}", (args.out / "ui-run-graph.png").resolve())
    report = f"{st.ui_url}/artifacts/artifact/{artifact_id}"
    _shoot(report, (args.out / "ui-report-artifact.png").resolve())


if __name__ == "__main__":
    main()
