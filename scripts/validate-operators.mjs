// Validates the KEDA and Prometheus Operator resources of the manifests
// given against those operators' schemas (the @kubernetes-models
// packages); core kinds are left to kubernetes-validate. Exits non-zero
// naming the first resource that does not validate, or a kind it does not
// know.
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const operators = { ScaledObject, TriggerAuthentication, ServiceMonitor };
const core = new Set(["Secret", "Service", "ConfigMap", "Deployment", "Job", "PodDisruptionBudget"]);
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const resource of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (!resource) continue;
    const name = `${file}: ${resource.kind} ${resource.metadata?.name}`;
    if (core.has(resource.kind)) continue;
    const Model = operators[resource.kind];
    if (!Model) {
      console.error(`${name}: no schema for this kind`);
      process.exit(1);
    }
    try {
      new Model(resource).validate();
    } catch (e) {
      console.error(`${name} is not valid: ${e.message}`);
      process.exit(1);
    }
    checked += 1;
  }
}
console.error(`operators: ${checked} resource(s) valid`);
