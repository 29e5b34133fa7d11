"""`orfeas autoscale analyze TRACE.csv`: the load profile of a trace and the autoscaling settings
it suggests (scaling/analyze.py). `cluster/cli.py` calls `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cluster.console import JsonOpt, console, fail, print_json, table

autoscale_app = typer.Typer(help="Autoscaling: analyse load traces.", no_args_is_help=True)
DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "engine_profile.json"


def register(app: typer.Typer) -> None:
    app.add_typer(autoscale_app, name="autoscale")


@autoscale_app.command()
def analyze(
    trace: Annotated[Path, typer.Argument(help="Azure-format CSV: TIMESTAMP, ContextTokens, GeneratedTokens.")],
    profile: Annotated[Optional[Path], typer.Option(help="Engine profile JSON (benchmarks/engine_profile.py); "
                                                    "default: benchmarks/results/engine_profile.json if present.")] = None,
    compress: Annotated[float, typer.Option(help="Replay the trace this many times faster.")] = 1.0,
    json_out: JsonOpt = False,
):
    """Rate over time, burstiness, periodicity and token mix of TRACE, and recommended settings."""
    from scaling.analyze import profile_trace, recommend
    from scaling.simulator import Profile
    from scaling.traces import TraceError, load_csv

    try:
        tr = load_csv(trace)
        if compress != 1.0:
            tr = tr.compressed(compress)
        prof = profile_trace(tr)
    except (TraceError, ValueError) as e:
        fail(str(e), 2)
    engine_file = profile or (DEFAULT_PROFILE if DEFAULT_PROFILE.is_file() else None)
    engine = None
    if engine_file is not None:
        try:
            engine = Profile.load(engine_file)
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"engine profile {engine_file}: {e}", 2)
    rec = recommend(prof, engine)
    if json_out:
        print_json({"profile": prof, "recommended": rec})
        return
    r, b, per, tok = prof["rate_rps"], prof["burstiness"], prof["periodicity"], prof["tokens"]
    t = table("load", "value")
    t.add_row("requests", f"{prof['requests']:,} over {prof['duration_s'] / 60:.1f} min")
    t.add_row("rate req/s (per minute)", f"mean {r['mean']:.2f}  min {r['min']:.2f}  p50 {r['p50']:.2f}  "
              f"p90 {r['p90']:.2f}  max {r['max']:.2f}  (peak/mean {r['peak_to_mean']:.2f})")
    t.add_row("burstiness", f"inter-arrival CV {b['interarrival_cv']:.2f} (Poisson 1)  "
              f"10 s dispersion {b['dispersion_10s']:.2f}")
    t.add_row("periodicity", "none found" if not per["period_s"] else
              f"{per['period_s'] / 60:.0f} min (autocorrelation {per['autocorrelation']:.2f})")
    t.add_row("prompt tokens", f"mean {tok['prompt']['mean']:.0f}  p50 {tok['prompt']['p50']:.0f}  "
              f"p99 {tok['prompt']['p99']:.0f}")
    t.add_row("output tokens", f"mean {tok['output']['mean']:.0f}  p50 {tok['output']['p50']:.0f}  "
              f"p99 {tok['output']['p99']:.0f}  (prompt share {tok['prompt_share']:.0%})")
    console.print(t)
    s = table("autoscaling setting", "recommended")
    for k, v in rec.items():
        if k != "why":
            s.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    console.print(s)
    for why in rec["why"]:
        console.print(f"- {why}")
