"""Writes ray_resnet_grafana_dashboard.json, the Grafana dashboard of this project's training
metrics, with Ray's own dashboard generator (ray.dashboard.modules.metrics), so that its panels,
variables and data source follow the dashboards Ray writes for itself and it provisions beside
them (see cluster/README.md).

    python cluster/grafana/build_dashboard.py           # rewrite the JSON
    python cluster/grafana/build_dashboard.py --check   # exit 1 if the JSON is not what this writes

The project's series are the ray.util.metrics gauges of pipelines/tracking.py (Ray prefixes "ray_"),
tagged run and rank; GPU, GPU-memory and CPU use are Ray's own node metrics. Every query keeps
Ray's SessionName filter.
"""
import argparse
import json
from pathlib import Path

import ray
from ray.dashboard.modules.metrics.dashboards.common import DashboardConfig, Panel, Target
# Private, but the panels' JSON is Ray's own only through it: Ray's public dashboards are made by
# it. The --check test (tests/test_cluster.py) fails if a Ray upgrade moves it.
from ray.dashboard.modules.metrics.grafana_dashboard_factory import _generate_grafana_panels

OUT = Path(__file__).with_name("ray_resnet_grafana_dashboard.json")
UID = "rayResnetDashboard"


def run(metric: str) -> str:
    """metric{run, rank and Ray's global filters} in the template Ray's generator formats."""
    return metric + '{{run=~"$Run", rank=~"$Rank", {global_filters}}}'


def node(metric: str) -> str:
    return metric + '{{instance=~"$Instance", {global_filters}}}'


PANELS = [
    Panel(id=1, title="Training images/s per rank", unit="short", stack=False, fill=0,
          description="Images per second each DDP worker trained in its last epoch "
                      "(ray_resnet_images_per_s), and their sum, the run's global rate.",
          targets=[Target(expr=f"sum({run('ray_resnet_images_per_s')}) by (run, rank)",
                          legend="{{run}} rank {{rank}}"),
                   Target(expr=f"sum({run('ray_resnet_images_per_s')}) by (run)",
                          legend="{{run}} all ranks")]),
    Panel(id=2, title="Training loss per rank", unit="none", stack=False, fill=0,
          description="Mean training loss of each worker's last epoch (ray_resnet_train_loss).",
          targets=[Target(expr=f"sum({run('ray_resnet_train_loss')}) by (run, rank)",
                          legend="{{run}} rank {{rank}}")]),
    Panel(id=3, title="Validation error", unit="percentunit", stack=False, fill=0,
          description="Top-1 validation error after the last epoch, over the whole validation "
                      "split (ray_resnet_val_error; every rank reports the same all-reduced value).",
          targets=[Target(expr=f"max({run('ray_resnet_val_error')}) by (run)", legend="{{run}}")]),
    Panel(id=4, title="Data-wait share per rank", unit="percentunit", stack=False, fill=0,
          description="Share of each worker's last epoch spent waiting for its next batch from "
                      "Ray Data (ray_resnet_data_wait): near 0 the input keeps up; high, the "
                      "GPUs starve for decoded images.",
          targets=[Target(expr=f"sum({run('ray_resnet_data_wait')}) by (run, rank)",
                          legend="{{run}} rank {{rank}}")]),
    Panel(id=5, title="GPU utilisation", unit="%", stack=False, fill=0,
          description="Each GPU's utilisation as Ray's node agent reads it (ray_node_gpus_utilization, "
                      "0-100).",
          targets=[Target(expr=f"sum({node('ray_node_gpus_utilization')}) by (instance, GpuIndex, GpuDeviceName)",
                          legend="{{instance}} gpu.{{GpuIndex}} {{GpuDeviceName}}")]),
    Panel(id=6, title="GPU memory used", unit="bytes", stack=False, fill=0,
          description="Each GPU's memory in use (ray_node_gram_used, MB); MAX: all shown GPUs' memory.",
          targets=[Target(expr=f"sum({node('ray_node_gram_used')} * 1024 * 1024) by (instance, GpuIndex)",
                          legend="{{instance}} gpu.{{GpuIndex}}"),
                   Target(expr=f"sum(({node('ray_node_gram_used')} + {node('ray_node_gram_available')}) "
                               "* 1024 * 1024)",
                          legend="MAX")]),
    Panel(id=7, title="CPU utilisation per node", unit="%", stack=False, fill=0,
          description="Each node's CPU use (ray_node_cpu_utilization): decoding and augmentation run "
                      "on CPUs, so a busy CPU with a high data-wait share means more CPUs per GPU.",
          targets=[Target(expr=f"sum({node('ray_node_cpu_utilization')}) by (instance)",
                          legend="{{instance}}")]),
]

CONFIG = DashboardConfig(name="RAY_RESNET", default_uid=UID, panels=PANELS,
                         standard_global_filters=['SessionName=~"$SessionName"'],
                         base_json_file_name="")


def variable(name: str, query: str, description: str, hide: int = 0, multi: bool = True) -> dict:
    """A Grafana query variable as Ray's dashboards write them."""
    return {"name": name, "type": "query", "description": description, "datasource": "${datasource}",
            "definition": query, "query": {"query": query, "refId": "StandardVariableQuery"},
            "refresh": 1, "hide": hide, "includeAll": True, "multi": multi, "allValue": ".*", "sort": 2,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def dashboard() -> str:
    return json.dumps({
        "title": "ray-resnet Training",
        "uid": UID,
        "description": "Training throughput, loss, validation error and input wait of ray-resnet runs, "
                       "with the GPUs and CPUs that run them. Written by cluster/grafana/build_dashboard.py.",
        "version": 1, "schemaVersion": 27, "style": "dark", "editable": True, "graphTooltip": 1,
        "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": [{"builtIn": 1, "datasource": "-- Grafana --", "enable": True, "hide": True,
                                  "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                                  "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "description": "Filter queries of a specific "
             "Prometheus type.", "datasource": None, "query": "prometheus", "refresh": 1, "hide": 2,
             "includeAll": False, "multi": False, "current": {"selected": False}},
            variable("SessionName", "label_values(ray_resnet_images_per_s, SessionName)",
                     "Filter queries to specific Ray sessions.", multi=False),
            variable("Run", 'label_values(ray_resnet_images_per_s{SessionName=~"$SessionName"}, run)',
                     "The training runs (run.name) to show."),
            variable("Rank", 'label_values(ray_resnet_images_per_s{SessionName=~"$SessionName", '
                     'run=~"$Run"}, rank)', "The DDP ranks to show."),
            variable("Instance", 'label_values(ray_node_cpu_utilization{SessionName=~"$SessionName"}, instance)',
                     "The nodes (Prometheus instances) to show."),
        ]},
        "panels": _generate_grafana_panels(CONFIG, [], ""),
        "tags": ["ray-resnet", f"rayVersion:{ray.__version__}"],
    }, indent=4) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON is not what this writes")
    args = parser.parse_args()
    text = dashboard()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            raise SystemExit(f"{OUT} is not what {Path(__file__).name} writes: run it to rewrite the JSON")
    else:
        OUT.write_text(text)
        print(f"wrote {OUT}")
