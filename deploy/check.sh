#!/usr/bin/env bash
# Validates the deploy files and the example pipelines, offline and strictly (CI-ready).
#
#   bash deploy/check.sh                  # everything, then the self-test
#   FLOWGATE_BIN=target/debug/flowgate bash deploy/check.sh    # also `flowgate validate`
#   bash deploy/check.sh --no-self-test
#
# What it checks, one line per file:
# - deploy/kubernetes/*.yaml of built-in kinds: `kubernetes-validate -k 1.33.0 --strict`
#   (unknown fields fail; so does a kind/apiVersion it has no schema for, which the tool itself
#   only warns about);
# - custom resources (the KEDA ScaledObject): against the openAPIV3Schema of KEDA's own CRD
#   (Go module github.com/kedacore/keda/v2), made strict: `additionalProperties: false` on every
#   object schema with `properties` unless it says x-kubernetes-preserve-unknown-fields,
#   int-or-string and nullable handled, metadata checked as a strict ObjectMeta, the CEL rule
#   of the CRD evaluated, and the prometheus trigger's metadata keys checked against the names
#   KEDA's prometheus scaler reads (KEDA itself ignores a misspelled optional key);
# - kustomization.yaml: its keys, its resources exist, one autoscaler; `kubectl kustomize`
#   output validated again when kubectl is installed;
# - references between the manifests (selectors, ports, ConfigMap, Secret keys, scale target,
#   the pipeline name in the lag query, grace period > drain timeout, no namespace);
# - the autoscalers' PromQL (the ScaledObject's query, the prometheus-adapter rule in
#   hpa.yaml's comment) with `promtool check rules`, when promtool is found (PATH, /usr/bin,
#   or the rig's cache where `cargo xtask test` puts it);
# - deploy/Dockerfile: static checks (non-root, --locked, the binary, the exposed port);
# - with FLOWGATE_BIN: `$FLOWGATE_BIN validate -c FILE` for the ConfigMap's pipeline file (with
#   the Deployment's environment, Secret values from secret.yaml) and every
#   examples/pipelines/*.toml: exit 0 (all reachable) or 3 (a broker unreachable: fine
#   offline) pass, 2 (invalid file) fails, 4 (a running broker refused: a topic, stream or
#   queue missing, or credentials) passes with a warning: the file is valid. Against running
#   brokers validate connects as `run` would: a PostgreSQL store creates its tables (and the
#   table sink its table) if missing; nothing is consumed or produced.
# - self-test: broken copies must be REJECTED, or the script fails: ScaledObject with
#   `cooldownPeriodd`, a nested typo, a number where KEDA wants a string, an unknown trigger
#   key, min > max, an unparsable query; Deployment with an unknown field (top and nested), an
#   unknown apiVersion, a missing Secret key, a grace period not above the drain timeout; a
#   pipeline file with a key typo (flowgate validate exit 2).
#
# Tools, cached under ${FLOWGATE_TOOLS_DIR:-target/tools}: a Python venv with
# kubernetes-validate==1.37.0 (installed only if missing; python3 needed) and KEDA's CRD
# (fetched once with `go mod download`; go needed only for that first run).
set -euo pipefail

K8S_VERSION=1.33.0
KV_VERSION=1.37.0
KEDA_MODULE=github.com/kedacore/keda/v2
KEDA_VERSION=v2.21.1
# The module zip's hash (go.sum's h1:), checked on download: the CRD is what was reviewed.
KEDA_SUM='h1:AoPpnkEeuSYUb1dAqQO5Pud9BpCPiOqurnKtnKobl6Q='

self_test=1
for arg in "$@"; do
  case $arg in
    --no-self-test) self_test=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "check.sh: unknown argument $arg (see --help)" >&2; exit 64 ;;
  esac
done

started=$SECONDS
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
tools=${FLOWGATE_TOOLS_DIR:-target/tools}
[[ $tools == /* ]] || tools=$root/$tools
venv=$tools/venv
keda_dir=$tools/keda-$KEDA_VERSION
k8s_dir=deploy/kubernetes
work=$(mktemp -d "${TMPDIR:-/tmp}/flowgate-check.XXXXXX")
cleanup() {
  # Background `flowgate validate` runs still going (an early exit): stop them, by their PIDs.
  local pid
  for pid in $(jobs -p); do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

failures=0
warnings=0
checked=0
ok() { printf 'ok    %s\n' "$*"; checked=$((checked + 1)); }
warn() { printf 'warn  %s\n' "$*"; checked=$((checked + 1)); warnings=$((warnings + 1)); }
fail() { printf 'FAIL  %s\n' "$*"; checked=$((checked + 1)); failures=$((failures + 1)); }
indent() { sed 's/^/      /'; }
die() { printf 'check.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# The Python half: YAML/TOML parsing, the CRD schema, cross-references. Written out, then run
# with the venv's interpreter (PyYAML and jsonschema come with kubernetes-validate).
cat >"$work/check.py" <<'PY'
import base64, copy, glob, hashlib, importlib.resources, json, os, re, shutil, sys, tomllib, zipfile

import jsonschema
import referencing
import yaml

K8S_VERSION = os.environ["K8S_VERSION"]


def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def say(*lines):
    for line in lines:
        print(line)


# --- the KEDA CRDs ---------------------------------------------------------------------------

def h1_of_zip(path):
    """golang.org/x/mod/sumdb/dirhash.HashZip: the h1: of a module zip."""
    summary = hashlib.sha256()
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            summary.update(("%s  %s\n" % (hashlib.sha256(z.read(name)).hexdigest(), name)).encode())
    return "h1:" + base64.b64encode(summary.digest()).decode()


def fetch_crds(json_file, want_sum, dest):
    """From `go mod download -json` output: copy config/crd/bases/*.yaml and the prometheus
    scaler's sources (for its metadata key names) into dest. Uses the module directory when go
    extracted it, else the verified zip (go refuses to extract a module whose go.mod asks for a
    newer Go than the local toolchain, but it has downloaded and verified the zip by then)."""
    raw = open(json_file).read().strip()
    if not raw:
        sys.exit("go mod download printed nothing (see its error above)")
    info = json.loads(raw)
    if info.get("Sum") and info["Sum"] != want_sum:
        sys.exit("checksum mismatch: go reports %s, expected %s" % (info["Sum"], want_sum))
    wanted = re.compile(r"^(config/crd/bases/[^/]+\.yaml|pkg/scalers/prometheus_scaler\.go|"
                        r"pkg/scalers/authentication/authentication_types\.go)$")
    tmp = dest + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n = 0
    if info.get("Dir") and os.path.isdir(info["Dir"]):
        for dirpath, _, files in os.walk(info["Dir"]):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), info["Dir"])
                if wanted.match(rel):
                    shutil.copy(os.path.join(dirpath, f), os.path.join(tmp, os.path.basename(rel)))
                    n += 1
        how = "module directory"
    elif info.get("Zip") and os.path.isfile(info["Zip"]):
        got = h1_of_zip(info["Zip"])
        if got != want_sum:
            sys.exit("checksum mismatch: %s hashes to %s, expected %s" % (info["Zip"], got, want_sum))
        prefix = "%s@%s/" % (info["Path"], info["Version"])
        with zipfile.ZipFile(info["Zip"]) as z:
            for name in z.namelist():
                rel = name[len(prefix):] if name.startswith(prefix) else name
                if wanted.match(rel):
                    with open(os.path.join(tmp, os.path.basename(rel)), "wb") as out:
                        out.write(z.read(name))
                    n += 1
        how = "module zip, %s verified" % got
    else:
        sys.exit("go mod download gave neither Dir nor Zip: %s" % info.get("Error", raw))
    if not glob.glob(os.path.join(tmp, "*_scaledobjects.yaml")):
        sys.exit("no ScaledObject CRD in %s@%s" % (info.get("Path"), info.get("Version")))
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    say("fetched %d files from the %s into %s" % (n, how, dest))


def find_crd(crd_dir, api_version, kind):
    group, _, version = api_version.rpartition("/")
    for path in sorted(glob.glob(os.path.join(crd_dir, "*.yaml"))):
        for crd in docs(path):
            spec = crd.get("spec", {})
            if crd.get("kind") == "CustomResourceDefinition" and spec.get("group") == group \
                    and spec.get("names", {}).get("kind") == kind:
                for v in spec.get("versions", []):
                    if v.get("name") == version and v.get("served"):
                        return v["schema"]["openAPIV3Schema"], os.path.basename(path)
                sys.exit("%s: no served version %s" % (path, version))
    return None, None


def strict(node):
    """A CRD's structural schema as a JSON schema that refuses unknown fields."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        t = node["type"]
        node["type"] = [t, "null"] if isinstance(t, str) else list(t) + ["null"]
    if "properties" in node:
        node["properties"] = {k: strict(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = strict(node["items"])
    for k in ("anyOf", "oneOf", "allOf"):
        if k in node:
            node[k] = [strict(x) for x in node[k]]
    return node


def k8s_definitions():
    base = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = base / ("v%s-local-strict" % K8S_VERSION) / "_definitions.json"
    return json.loads(path.read_text())


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(v):
    return not isinstance(v, int) or isinstance(v, bool) or -2**31 <= v < 2**31


@FORMATS.checks("int64")
def _int64(v):
    return not isinstance(v, int) or isinstance(v, bool) or -2**63 <= v < 2**63


# The CEL rules of the CRDs we use, as Python. A rule not listed is reported, not evaluated.
CEL = {
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)":
        lambda s: "minReplicaCount" not in s or s["minReplicaCount"] <= s.get("maxReplicaCount", 100),
}


def cel(schema, inst, path, errors, notes):
    if not isinstance(schema, dict):
        return
    for rule in schema.get("x-kubernetes-validations", []):
        text = " ".join(rule["rule"].split())
        fn = CEL.get(text)
        if fn is None:
            notes.append("CEL rule at %s not evaluated: %s" % (path, text))
        elif not fn(inst):
            errors.append("%s: %s" % (path, rule.get("message", text)))
    if isinstance(inst, dict):
        for k, v in inst.items():
            sub = schema.get("properties", {}).get(k)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            cel(sub, v, "%s.%s" % (path, k), errors, notes)
    elif isinstance(inst, list):
        for i, v in enumerate(inst):
            cel(schema.get("items"), v, "%s[%d]" % (path, i), errors, notes)


def scaler_keys(crd_dir, scaler):
    """The trigger metadata names a KEDA scaler reads (its `keda:"name=…, order=triggerMetadata"` tags)."""
    names = set()
    for f in ("%s_scaler.go" % scaler, "authentication_types.go"):
        path = os.path.join(crd_dir, f)
        if not os.path.exists(path):
            return None
        for tag in re.findall(r'keda:"([^"]*)"', open(path).read()):
            fields = dict(p.strip().split("=", 1) for p in tag.split(",") if "=" in p)
            if "name" in fields and "triggerMetadata" in fields.get("order", ""):
                names.update(fields["name"].split(";"))
    return names


def keda_rules(doc, crd_dir, errors):
    """What KEDA's admission webhook and scalers refuse, beyond the schema."""
    if doc.get("kind") != "ScaledObject":
        return
    spec = doc.get("spec", {})
    triggers = spec.get("triggers", [])
    for i, t in enumerate(triggers):
        at = "spec.triggers[%d]" % i
        mt = t.get("metricType", "AverageValue")
        if mt not in ("AverageValue", "Value"):
            errors.append("%s.metricType: %r is not AverageValue or Value (scalers other than cpu/memory)" % (at, mt))
        if "fallback" in spec and mt != "AverageValue":
            errors.append("%s.metricType: fallback needs AverageValue" % at)
        if t.get("type") == "prometheus":
            md = t.get("metadata", {})
            for key in ("serverAddress", "query", "threshold"):
                if not md.get(key):
                    errors.append("%s.metadata.%s: required by the prometheus scaler" % (at, key))
            for key in ("threshold", "activationThreshold"):
                if key in md:
                    try:
                        float(md[key])
                    except (TypeError, ValueError):
                        errors.append("%s.metadata.%s: %r is not a number" % (at, key, md[key]))
            for key in ("ignoreNullValues", "unsafeSsl"):
                if key in md and str(md[key]).lower() not in ("true", "false"):
                    errors.append("%s.metadata.%s: %r is not true or false" % (at, key, md[key]))
            if md.get("serverAddress") and not re.match(r"^https?://", str(md["serverAddress"])):
                errors.append("%s.metadata.serverAddress: not an http(s) URL" % at)
            known = scaler_keys(crd_dir, "prometheus")
            if known is None:
                errors.append("prometheus scaler sources missing from %s (delete it to fetch again)" % crd_dir)
            else:
                for key in md:
                    if key not in known:
                        errors.append("%s.metadata.%s: not a key of KEDA's prometheus scaler (%s)"
                                      % (at, key, ", ".join(sorted(known))))


def crd_validate(crd_dir, path):
    """Exit 0 and one summary line if every document of `path` is valid, else the errors."""
    defs = k8s_definitions()
    registry = referencing.Registry().with_resource(
        defs["$id"], referencing.Resource.from_contents(defs))
    errors, notes, names = [], [], []
    for n, doc in enumerate(docs(path)):
        where = "document %d (%s %s)" % (n + 1, doc.get("kind"), doc.get("metadata", {}).get("name"))
        api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        schema, crd_file = find_crd(crd_dir, api, kind)
        if schema is None:
            errors.append("%s: no CRD in %s for %s %s" % (where, crd_dir, api, kind))
            continue
        s = strict(copy.deepcopy(schema))
        s["properties"]["apiVersion"] = {"const": api}
        s["properties"]["kind"] = {"const": kind}
        s["properties"]["metadata"] = {
            "$ref": defs["$id"] + "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
        s["required"] = sorted(set(s.get("required", [])) | {"apiVersion", "kind", "metadata"})
        v = jsonschema.Draft202012Validator(s, registry=registry, format_checker=FORMATS)
        for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
            errors.append("%s: %s: %s" % (where, ".".join(map(str, e.absolute_path)) or "(root)", e.message))
        if not doc.get("metadata", {}).get("name"):
            errors.append("%s: metadata.name is required" % where)
        doc_errors = []
        cel(schema, doc, "", doc_errors, notes)
        keda_rules(doc, crd_dir, doc_errors)
        errors += ["%s: %s" % (where, e) for e in doc_errors]
        names.append("%s/%s against %s" % (kind, doc.get("metadata", {}).get("name"), crd_file))
    for note in notes:
        say("note: " + note)
    if errors:
        say(*errors)
        sys.exit(1)
    say(", ".join(names))


# --- files and their kinds -------------------------------------------------------------------

BUILTIN_GROUPS = re.compile(r"^(v1|(apps|batch|autoscaling|policy|networking\.k8s\.io|rbac\.authorization\.k8s\.io|"
                            r"storage\.k8s\.io|scheduling\.k8s\.io|coordination\.k8s\.io|discovery\.k8s\.io)/.+)$")


def classify(path):
    """`builtin`, `custom` or `kustomization`: what validates the file."""
    kinds = set()
    for d in docs(path):
        api = d.get("apiVersion", "")
        if api.startswith("kustomize.config.k8s.io/"):
            kinds.add("kustomization")
        elif BUILTIN_GROUPS.match(api) or "/" not in api:
            kinds.add("builtin")
        else:
            kinds.add("custom")
    if len(kinds) != 1:
        sys.exit("%s: mixes %s documents; keep one kind of file per document set" % (path, "/".join(sorted(kinds)) or "no"))
    print(kinds.pop())


def split(path, outdir):
    """Splits a multi-document stream (kustomize output) into one file per document, named by
    class, for the same validators."""
    os.makedirs(outdir, exist_ok=True)
    for n, d in enumerate(docs(path)):
        with open(os.path.join(outdir, "%02d-%s-%s.yaml" % (n, d["kind"].lower(), d["metadata"]["name"])), "w") as f:
            yaml.safe_dump(d, f, sort_keys=False)


KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "metadata", "resources", "components", "images", "labels", "commonLabels",
    "commonAnnotations", "namePrefix", "nameSuffix", "namespace", "patches", "replicas",
    "configMapGenerator", "secretGenerator", "generatorOptions", "replacements", "buildMetadata",
}


def kustomization(path):
    (k,) = docs(path)
    errors = []
    for key in k:
        if key not in KUSTOMIZATION_KEYS:
            errors.append("unknown key %r" % key)
    base = os.path.dirname(path)
    resources = k.get("resources", [])
    for r in resources:
        if not os.path.exists(os.path.join(base, r)):
            errors.append("resource %s does not exist" % r)
    if "keda-scaledobject.yaml" in resources and "hpa.yaml" in resources:
        errors.append("lists both keda-scaledobject.yaml and hpa.yaml: two autoscalers would fight over the replicas")
    if "namespace" in k:
        errors.append("names a namespace: the manifests stay namespace-agnostic (kubectl apply -k … -n NS)")
    if errors:
        say(*errors)
        sys.exit(1)
    unlisted = sorted(set(os.path.basename(p) for p in glob.glob(os.path.join(base, "*.yaml")))
                      - set(resources) - {os.path.basename(path)})
    say("resources %s; not listed: %s" % (", ".join(resources), ", ".join(unlisted) or "none"))


# --- references between the manifests --------------------------------------------------------

def duration_s(text):
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h)\s*", str(text))
    if not m:
        return None
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def objects(k8s_dir):
    out = {}
    for path in sorted(glob.glob(os.path.join(k8s_dir, "*.yaml"))):
        for d in docs(path):
            out.setdefault(d["kind"], []).append((os.path.basename(path), d))
    return out


def pipeline_files(cm):
    return {k: v for k, v in cm.get("data", {}).items() if k.endswith((".toml", ".yaml", ".yml"))}


def xref(k8s_dir):
    o = objects(k8s_dir)
    errors = []
    for kind, items in o.items():
        for f, d in items:
            if kind != "Kustomization" and "namespace" in d.get("metadata", {}):
                errors.append("%s: %s names a namespace (keep the manifests namespace-agnostic)" % (f, kind))
    cms = {d["metadata"]["name"]: d for _, d in o.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"]: d for _, d in o.get("Secret", [])}
    deployments = {d["metadata"]["name"]: d for _, d in o.get("Deployment", [])}
    pipelines = {}  # deployment name -> parsed pipeline file
    for name, dep in deployments.items():
        spec = dep["spec"]
        pod = spec["template"]
        labels = pod["metadata"].get("labels", {})
        for k, v in spec["selector"].get("matchLabels", {}).items():
            if labels.get(k) != v:
                errors.append("Deployment %s: selector %s=%s does not match the pod labels" % (name, k, v))
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for c in pod["spec"]["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    errors.append("Deployment %s: %s port %r is not a named container port" % (name, probe, port))
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    errors.append("Deployment %s: volumeMount %s has no volume" % (name, m["name"]))
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    s = secrets.get(ref["name"])
                    keys = set((s or {}).get("stringData", {})) | set((s or {}).get("data", {}))
                    if s is None:
                        errors.append("Deployment %s: env %s: no Secret %s in %s" % (name, e["name"], ref["name"], k8s_dir))
                    elif ref["key"] not in keys:
                        errors.append("Deployment %s: env %s: Secret %s has no key %s" % (name, e["name"], ref["name"], ref["key"]))
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref and ref["key"] not in cms.get(ref["name"], {}).get("data", {}):
                    errors.append("Deployment %s: env %s: no key %s in ConfigMap %s" % (name, e["name"], ref["key"], ref["name"]))
            for m in c.get("volumeMounts", []):
                vol = volumes.get(m["name"], {})
                if "configMap" in vol:
                    cm = cms.get(vol["configMap"]["name"])
                    if cm is None:
                        errors.append("Deployment %s: volume %s: no ConfigMap %s" % (name, m["name"], vol["configMap"]["name"]))
                        continue
                    for item in vol["configMap"].get("items", []):
                        if item["key"] not in cm.get("data", {}):
                            errors.append("Deployment %s: ConfigMap %s has no key %s" % (name, cm["metadata"]["name"], item["key"]))
                    args = c.get("args", [])
                    for i, a in enumerate(args):
                        if a in ("-c", "--config") and i + 1 < len(args) and args[i + 1].startswith(m["mountPath"] + "/"):
                            key = args[i + 1][len(m["mountPath"]) + 1:]
                            files = pipeline_files(cm)
                            if key not in files:
                                errors.append("Deployment %s: --config %s is not a key of ConfigMap %s" % (name, args[i + 1], cm["metadata"]["name"]))
                            else:
                                cfg = tomllib.loads(files[key])
                                pipelines[name] = cfg
                                listen = cfg.get("observability", {}).get("listen", "127.0.0.1:9464")
                                host, _, port = listen.rpartition(":")
                                if host in ("127.0.0.1", "localhost", "[::1]"):
                                    errors.append("Deployment %s: the pipeline listens on %s: probes and Prometheus cannot reach it" % (name, listen))
                                if int(port) not in ports.values():
                                    errors.append("Deployment %s: the pipeline listens on port %s, not a container port %s" % (name, port, sorted(ports.values())))
                                drain = duration_s(cfg.get("runtime", {}).get("drain_timeout", "30s"))
                                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                                if drain is not None and grace <= drain:
                                    errors.append("Deployment %s: terminationGracePeriodSeconds %s must exceed runtime.drain_timeout (%ss)" % (name, grace, drain))
        for _, svc in o.get("Service", []):
            sel = svc["spec"].get("selector", {})
            if sel and all(labels.get(k) == v for k, v in sel.items()):
                names = {p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])}
                nums = {p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
                for p in svc["spec"]["ports"]:
                    t = p.get("targetPort", p["port"])
                    if (isinstance(t, str) and t not in names) or (isinstance(t, int) and t not in nums):
                        errors.append("Service %s: targetPort %r is not a port of Deployment %s" % (svc["metadata"]["name"], t, name))
                ann = svc["metadata"].get("annotations", {}).get("prometheus.io/port")
                if ann and int(ann) not in nums:
                    errors.append("Service %s: prometheus.io/port %s is not a container port" % (svc["metadata"]["name"], ann))
    services = [svc for _, svc in o.get("Service", [])]
    for name, dep in deployments.items():
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        if not any(s["spec"].get("selector") and all(labels.get(k) == v for k, v in s["spec"]["selector"].items()) for s in services):
            errors.append("Deployment %s: no Service selects its pods (Prometheus finds them through one)" % name)
    maxes = {}
    for kind, field_min, field_max in (("ScaledObject", "minReplicaCount", "maxReplicaCount"),
                                       ("HorizontalPodAutoscaler", "minReplicas", "maxReplicas")):
        for f, d in o.get(kind, []):
            ref = d["spec"]["scaleTargetRef"]
            target = ref["name"]
            if ref.get("kind", "Deployment") != "Deployment" or target not in deployments:
                errors.append("%s %s: scaleTargetRef %s/%s is not a Deployment here" % (kind, d["metadata"]["name"], ref.get("kind", "Deployment"), target))
                continue
            maxes[f] = d["spec"].get(field_max)
            pipeline = pipelines.get(target, {}).get("name")
            if kind == "ScaledObject":
                for t in d["spec"]["triggers"]:
                    q = t.get("metadata", {}).get("query", "")
                    m = re.search(r'pipeline\s*=\s*"([^"]*)"', q)
                    if t.get("type") == "prometheus" and (not m or m.group(1) != pipeline):
                        errors.append("ScaledObject %s: the query selects pipeline %r, the ConfigMap runs %r" % (d["metadata"]["name"], m and m.group(1), pipeline))
                    if t.get("type") == "prometheus" and "flowgate_lag" not in q:
                        errors.append("ScaledObject %s: the query does not read flowgate_lag" % d["metadata"]["name"])
            else:
                for m in d["spec"].get("metrics", []):
                    sel = m.get("external", {}).get("metric", {}).get("selector", {}).get("matchLabels", {})
                    if m.get("type") == "External" and sel.get("pipeline") != pipeline:
                        errors.append("HPA %s: the metric selects pipeline %r, the ConfigMap runs %r" % (d["metadata"]["name"], sel.get("pipeline"), pipeline))
    if len(set(maxes.values())) > 1:
        errors.append("the autoscalers disagree on the maximum (the partition count): %s" % maxes)
    if errors:
        say(*errors)
        sys.exit(1)
    say("%d Deployment(s), %d Service(s), %d ConfigMap(s), %d Secret(s), autoscalers %s"
        % (len(deployments), len(services), len(cms), len(secrets), ", ".join("%s max %s" % kv for kv in sorted(maxes.items()))))


# --- the pipeline files -----------------------------------------------------------------------

def extract_pipelines(k8s_dir, outdir):
    """Every pipeline file of every ConfigMap, with the environment its Deployment gives it."""
    o = objects(k8s_dir)
    secrets = {d["metadata"]["name"]: d for _, d in o.get("Secret", [])}
    os.makedirs(outdir, exist_ok=True)
    for f, cm in o.get("ConfigMap", []):
        for key, text in pipeline_files(cm).items():
            out = os.path.join(outdir, "%s__%s" % (cm["metadata"]["name"], key))
            with open(out, "w") as fh:
                fh.write(text)
            env = []
            for _, dep in o.get("Deployment", []):
                vols = [v for v in dep["spec"]["template"]["spec"].get("volumes", [])
                        if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
                if not vols:
                    continue
                for c in dep["spec"]["template"]["spec"]["containers"]:
                    for e in c.get("env", []):
                        if "value" in e:
                            env.append((e["name"], str(e["value"])))
                        ref = e.get("valueFrom", {}).get("secretKeyRef")
                        if ref and ref["name"] in secrets:
                            s = secrets[ref["name"]]
                            if ref["key"] in s.get("stringData", {}):
                                env.append((e["name"], s["stringData"][ref["key"]]))
                            elif ref["key"] in s.get("data", {}):
                                env.append((e["name"], base64.b64decode(s["data"][ref["key"]]).decode()))
            with open(out + ".env", "w") as fh:
                for k, v in env:
                    fh.write("%s=%s\n" % (k, v))
            print("%s\t%s/%s [%s]" % (out, k8s_dir, f, key))


def secret_env(path):
    """Placeholders for the environment variables a pipeline file names (`*_env` keys), so that
    `flowgate validate` does not stop at "the variable is not set": deploy-time, not the file."""
    with open(path, "rb") as f:
        cfg = tomllib.load(f) if path.endswith(".toml") else yaml.safe_load(f)
    found = set()

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k.endswith("_env") and isinstance(x, str):
                    found.add(x)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(cfg)
    for var in sorted(found):
        value = {"KAFKA_SASL_PASSWORD": os.environ.get("FLOWGATE_TEST_KAFKA_SASL_PASSWORD", "")}.get(var) or "check-placeholder"
        print("%s=%s" % (var, value))


def promql(k8s_dir, out):
    """The PromQL the autoscalers run, as recording rules for `promtool check rules`: the
    ScaledObject's queries, and the prometheus-adapter rule written in hpa.yaml's comment (its
    YAML parsed too; the adapter's <<.Series>>/<<.LabelMatchers>> filled in)."""
    o = objects(k8s_dir)
    rules = []
    for f, d in o.get("ScaledObject", []):
        for i, t in enumerate(d["spec"].get("triggers", [])):
            if t.get("type") == "prometheus":
                rules.append({"record": "check:%s:trigger_%d" % (d["metadata"]["name"].replace("-", "_"), i),
                              "expr": t["metadata"]["query"]})
    for f, d in o.get("HorizontalPodAutoscaler", []):
        text = open(os.path.join(k8s_dir, f)).read()
        m = re.search(r"^#(\s+)externalRules:\n((?:#.*\n)+?)#\s*\n", text, re.M)
        if not m:
            sys.exit("%s: no prometheus-adapter externalRules block in the comment" % f)
        block = "externalRules:\n" + "".join(l[1 + len(m.group(1)):] + "\n" for l in m.group(2).splitlines())
        adapter = yaml.safe_load(block)
        for j, r in enumerate(adapter["externalRules"]):
            for key in r:
                if key not in ("seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"):
                    sys.exit("%s: adapter rule %d: unknown key %r" % (f, j, key))
            wanted = {m2["external"]["metric"]["name"] for m2 in d["spec"].get("metrics", []) if m2.get("type") == "External"}
            if r["name"].get("as") not in wanted:
                sys.exit("%s: the adapter rule names %r, the HPA reads %s" % (f, r["name"].get("as"), sorted(wanted)))
            rules.append({"record": "check:adapter_series_%d" % j, "expr": r["seriesQuery"]})
            expr = r["metricsQuery"].replace("<<.Series>>", "flowgate_lag").replace(
                "<<.LabelMatchers>>", 'pipeline="x",namespace="y"').replace("<<.GroupBy>>", "pipeline")
            rules.append({"record": "check:adapter_metrics_%d" % j, "expr": expr})
    with open(out, "w") as fh:
        yaml.safe_dump({"groups": [{"name": "flowgate-autoscaling-queries", "rules": rules}]}, fh, sort_keys=False)
    print(len(rules))


def mutate(src, dst, old, new):
    """A copy of src with the first `old` replaced by `new`; refuses if `old` is not there, so a
    self-test can never silently test the unchanged file."""
    text = open(src).read()
    if old not in text:
        sys.exit("self-test: %r not found in %s" % (old, src))
    with open(dst, "w") as f:
        f.write(text.replace(old, new, 1))


def dockerfile(path, cli_manifest):
    text = open(path).read()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.strip().startswith("#")]
    errors = []
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    for l in froms:
        image = l.split()[1]
        if ":" not in image.split("/")[-1] and "@" not in image:
            errors.append("%s: no tag (pin the base image)" % l)
    final = text[text.upper().rfind("\nFROM "):]
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        errors.append("the final stage does not switch to a non-root USER")
    build = [l for l in lines if "cargo build" in l]
    bins = re.findall(r'^name\s*=\s*"([^"]+)"', open(cli_manifest).read().split("[[bin]]", 1)[-1], re.M)
    if not build:
        errors.append("no cargo build")
    else:
        for flag in ("--release", "--locked"):
            if flag not in build[0]:
                errors.append("cargo build without %s" % flag)
        m = re.search(r"--bin\s+(\S+)", build[0])
        if not m or m.group(1) not in bins:
            errors.append("cargo build --bin %s is not a binary of %s (%s)" % (m and m.group(1), cli_manifest, bins))
    entry = re.findall(r"^ENTRYPOINT\s+(.*)$", final, re.M)
    copies = re.findall(r"^COPY\s+--from=\S+\s+(?:--\S+\s+)*\S+\s+(\S+)", final, re.M)
    if not entry or json.loads(entry[-1])[0] not in copies:
        errors.append("ENTRYPOINT %s is not a file copied into the final stage (%s)" % (entry, copies))
    if not re.search(r"^EXPOSE\s+9464\b", final, re.M):
        errors.append("EXPOSE 9464 (the endpoint's default port) missing")
    ignore = os.path.join(os.path.dirname(path), os.path.basename(path) + ".dockerignore")
    if not os.path.exists(ignore) or not re.search(r"^/?target/?$", open(ignore).read(), re.M):
        errors.append("%s must exclude target/" % ignore)
    if errors:
        say(*errors)
        sys.exit(1)
    say("%d stages (%s), non-root, cargo build --release --locked --bin %s, %s excludes target/"
        % (len(froms), " → ".join(l.split()[1] for l in froms), re.search(r"--bin\s+(\S+)", build[0]).group(1),
           os.path.basename(ignore)))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"fetch-crds": fetch_crds, "crd-validate": crd_validate, "classify": classify, "split": split,
     "kustomization": kustomization, "xref": xref, "extract-pipelines": extract_pipelines,
     "secret-env": secret_env, "mutate": mutate, "dockerfile": dockerfile, "promql": promql}[cmd](*args)
PY

# ---------------------------------------------------------------------------------------------
# Tools.
ensure_venv() {
  if [[ -x $venv/bin/kubernetes-validate ]] &&
    "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '$KV_VERSION')" 2>/dev/null; then
    return
  fi
  command -v python3 >/dev/null || die "python3 is needed (for a venv with kubernetes-validate)"
  echo "setup: a venv with kubernetes-validate==$KV_VERSION in $venv" >&2
  rm -rf "$venv"
  mkdir -p "$tools"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION" >&2
}

ensure_keda_crds() {
  [[ -s $keda_dir/keda.sh_scaledobjects.yaml && -s $keda_dir/prometheus_scaler.go ]] && return
  command -v go >/dev/null || die "go is needed once to fetch KEDA's CRDs ($KEDA_MODULE@$KEDA_VERSION) into $keda_dir"
  echo "setup: KEDA's CRDs from $KEDA_MODULE@$KEDA_VERSION (go mod download) into $keda_dir" >&2
  mkdir -p "$tools"
  # Outside any module; GOTOOLCHAIN=local: never download a Go toolchain. go may print an error
  # (the module's go.mod asks for a newer Go) and still have fetched and verified the zip.
  (cd "$work" && GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "$KEDA_MODULE@$KEDA_VERSION" >"$work/keda.json" 2>"$work/keda.err") || true
  "$py" "$work/check.py" fetch-crds "$work/keda.json" "$KEDA_SUM" "$keda_dir" >&2 ||
    { indent <"$work/keda.err" >&2; die "could not get KEDA's CRDs"; }
}

ensure_venv
py=$venv/bin/python
export K8S_VERSION
ensure_keda_crds

# ---------------------------------------------------------------------------------------------
# Validators: each returns 0 if the file is valid, prints the reasons otherwise.
kv_check() {
  local out rc=0
  out=$("$venv/bin/kubernetes-validate" -k "$K8S_VERSION" --strict "$1" 2>&1) || rc=$?
  # Every line must be a pass: kubernetes-validate only WARNs (exit 0) on a kind or apiVersion
  # it has no schema for, which would let `apps/v2` or a misspelled kind through.
  if ((rc != 0)) || [[ -z $out ]] || grep -qv '^INFO .* passed for resource ' <<<"$out"; then
    printf '%s\n' "$out"
    return 1
  fi
  sed -E 's/^INFO .* passed for resource ([^ ]+) against version ([^ ]+)$/\1 (kubernetes \2 strict)/' <<<"$out" | paste -sd, -
}

crd_check() { "$py" "$work/check.py" crd-validate "$keda_dir" "$1"; }

manifest_check() { # FILE → validates by class
  local class
  class=$("$py" "$work/check.py" classify "$1") || return 1
  case $class in
    builtin) kv_check "$1" ;;
    custom) crd_check "$1" ;;
    kustomization) "$py" "$work/check.py" kustomization "$1" ;;
  esac
}

report() { # LABEL CMD... : runs CMD, prints ok/FAIL with its summary or reasons
  local label=$1 out
  shift
  if out=$("$@" 2>&1); then
    ok "$label: $(tail -n 1 <<<"$out")"
    grep '^note: ' <<<"$out" | indent || true
  else
    fail "$label"
    printf '%s\n' "$out" | indent
  fi
}

# ---------------------------------------------------------------------------------------------
# `flowgate validate` on every pipeline file, in the background while the manifests are checked
# (each waits for its unreachable brokers: up to ~30 s for a PostgreSQL store's give_up_after).
declare -a pl_files=() pl_labels=() pl_envs=() pids=()
flowgate_validate_start() { # INDEX FILE ENVFILE
  local i=$1 file=$2 envfile=$3 dir=$work/run-$1
  mkdir -p "$dir"
  local -a env=(PATH="$PATH" HOME="${HOME:-/tmp}")
  [[ -n ${FLOWGATE_TEST_KAFKA_SASL_PASSWORD:-} ]] && env+=(FLOWGATE_TEST_KAFKA_SASL_PASSWORD="$FLOWGATE_TEST_KAFKA_SASL_PASSWORD")
  while IFS= read -r line; do [[ -n $line ]] && env+=("$line"); done < <("$py" "$work/check.py" secret-env "$file")
  if [[ -n $envfile ]]; then
    while IFS= read -r line; do [[ -n $line ]] && env+=("$line"); done <"$envfile"
  fi
  # A clean environment (no FLOWGATE_* of the caller's shell), run in a scratch directory
  # (the embedded store and JSON-lines sinks create their files relative to it).
  (cd "$dir" && exec env -i "${env[@]}" timeout 180 "$FLOWGATE_BIN" validate -c "$file" >"$dir/out" 2>"$dir/err") &
  pids[$i]=$!
}

flowgate_validate_exit() { # INDEX → $vrc, the exit code of that run (`wait` in this shell)
  vrc=0
  wait "${pids[$1]}" || vrc=$?
}

flowgate_validate_report() { # INDEX LABEL
  local dir=$work/run-$1 label=$2 rc reason
  flowgate_validate_exit "$1"
  rc=$vrc
  reason=$(grep -m1 '^✗' "$dir/out" | cut -c1-160 || true)
  case $rc in
    0) ok "$label: flowgate validate: exit 0 (parses, everything reachable)" ;;
    3) ok "$label: flowgate validate: exit 3 (parses; unreachable: ${reason#✗ })" ;;
    4) warn "$label: flowgate validate: exit 4 (parses; a running service refused: ${reason#✗ })" ;;
    *)
      fail "$label: flowgate validate: exit $rc"
      { cat "$dir/out"; tail -n 5 "$dir/err"; } | indent
      ;;
  esac
}

if [[ -n ${FLOWGATE_BIN:-} ]]; then
  [[ -x $FLOWGATE_BIN ]] || die "FLOWGATE_BIN=$FLOWGATE_BIN is not an executable"
  FLOWGATE_BIN=$(cd "$(dirname "$FLOWGATE_BIN")" && pwd)/$(basename "$FLOWGATE_BIN")
  while IFS=$'\t' read -r file label; do
    pl_files+=("$file") pl_labels+=("$label (ConfigMap, with the Deployment's environment)") pl_envs+=("$file.env")
  done < <("$py" "$work/check.py" extract-pipelines "$k8s_dir" "$work/pipelines")
  for f in examples/pipelines/*.toml; do
    [[ -e $f ]] || continue
    pl_files+=("$root/$f") pl_labels+=("$f") pl_envs+=("")
  done
  for i in "${!pl_files[@]}"; do flowgate_validate_start "$i" "${pl_files[$i]}" "${pl_envs[$i]}"; done
  if ((self_test)); then
    # A misspelled key must make `flowgate validate` exit 2.
    "$py" "$work/check.py" mutate "${pl_files[0]}" "$work/typo.toml" 'session_timeout' 'session_timout'
    neg_index=${#pl_files[@]}
    flowgate_validate_start "$neg_index" "$work/typo.toml" "${pl_envs[0]}"
  fi
fi

# ---------------------------------------------------------------------------------------------
echo "== manifests ($k8s_dir)"
for f in "$k8s_dir"/*.yaml; do
  report "$f" manifest_check "$f"
done
report "$k8s_dir (references between the manifests)" "$py" "$work/check.py" xref "$k8s_dir"

if command -v kubectl >/dev/null; then
  if kubectl kustomize "$k8s_dir" >"$work/built.yaml" 2>"$work/kustomize.err"; then
    "$py" "$work/check.py" split "$work/built.yaml" "$work/built"
    built_ok=1
    for f in "$work"/built/*.yaml; do
      if ! manifest_check "$f" >"$work/one.out" 2>&1; then
        built_ok=0
        echo "$(basename "$f"):" >>"$work/built.err"
        cat "$work/one.out" >>"$work/built.err"
      fi
    done
    if ((built_ok)); then
      ok "kubectl kustomize $k8s_dir: $(ls "$work/built" | wc -l) objects, each valid as above"
    else
      fail "kubectl kustomize $k8s_dir: the rendered objects do not validate"
      indent <"$work/built.err"
    fi
  else
    fail "kubectl kustomize $k8s_dir"
    indent <"$work/kustomize.err"
  fi
else
  echo "skip  kubectl kustomize $k8s_dir (kubectl not installed; kustomization.yaml checked above)"
fi

promtool=$(command -v promtool || true)
for candidate in /usr/bin/promtool "${FLOWGATE_RIG_CACHE:-${HOME:-/root}/.cache/flowgate-rig}/prometheus/root/usr/bin/promtool"; do
  [[ -z $promtool && -x $candidate ]] && promtool=$candidate
done
if [[ -n $promtool ]]; then
  promql_check() { # [DIR]
    local n
    n=$("$py" "$work/check.py" promql "${1:-$k8s_dir}" "$work/queries.yml") || return 1
    if ! "$promtool" check rules "$work/queries.yml" >"$work/promtool.out" 2>&1; then
      grep -q 'could not parse' "$work/promtool.out" &&
        sed -n 's/.*rule [0-9]*, "\([^"]*\)": could not parse expression: /\1: /p' "$work/promtool.out" ||
        cat "$work/promtool.out"
      return 1
    fi
    echo "$n expressions parse (promtool check rules)"
  }
  report "$k8s_dir (autoscaling PromQL: the ScaledObject's query, hpa.yaml's adapter rule)" promql_check
else
  echo "skip  autoscaling PromQL (no promtool; \`cargo xtask test\` fetches Debian's into the rig cache)"
fi

echo "== image"
report deploy/Dockerfile "$py" "$work/check.py" dockerfile deploy/Dockerfile crates/flowgate-cli/Cargo.toml

# ---------------------------------------------------------------------------------------------
if [[ -n ${FLOWGATE_BIN:-} ]]; then
  echo "== pipeline files ($FLOWGATE_BIN validate)"
  for i in "${!pl_files[@]}"; do flowgate_validate_report "$i" "${pl_labels[$i]}"; done
else
  echo "skip  pipeline files: set FLOWGATE_BIN to a flowgate binary to run \`flowgate validate\` on them"
fi

# ---------------------------------------------------------------------------------------------
# Self-test: the checks must refuse what they claim to refuse.
rejected=0
if ((self_test)); then
  echo "== self-test (each must be REJECTED)"
  negative() { # DESCRIPTION VALIDATOR FILE OLD NEW [dir]: VALIDATOR gets the broken copy of
    # FILE, or with `dir` a copy of FILE's directory holding it
    local what=$1 validator=$2 src=$3 old=$4 new=$5 copy out target
    if [[ ${6:-} == dir ]]; then
      rm -rf "$work/neg-dir" && cp -r "$(dirname "$src")" "$work/neg-dir"
      copy=$work/neg-dir/$(basename "$src") target=$work/neg-dir
    else
      copy=$work/neg-$(basename "$src") target=$copy
    fi
    "$py" "$work/check.py" mutate "$src" "$copy.new" "$old" "$new" && mv "$copy.new" "$copy"
    if out=$("$validator" "$target" 2>&1); then
      fail "self-test: $what was ACCEPTED"
      printf '%s\n' "$out" | indent
    else
      ok "self-test: $what rejected: $(grep -v '^note: ' <<<"$out" | grep -m1 . |
        sed -E 's/^ERROR .* against version [0-9.]+: /kubernetes-validate: /; s/^document [0-9]+ \([^)]*\): //' | cut -c1-150)"
      rejected=$((rejected + 1))
    fi
  }
  so=$k8s_dir/keda-scaledobject.yaml
  dep=$k8s_dir/deployment.yaml
  negative "ScaledObject with spec.cooldownPeriodd" crd_check "$so" "cooldownPeriod: 120" "cooldownPeriodd: 120"
  negative "ScaledObject with a nested typo (stabilisationWindowSeconds)" crd_check "$so" "stabilizationWindowSeconds: 300" "stabilisationWindowSeconds: 300"
  negative "ScaledObject with a number for a trigger's threshold" crd_check "$so" 'threshold: "10000"' 'threshold: 10000'
  negative "ScaledObject with an unknown prometheus key (activationThresold)" crd_check "$so" "activationThreshold:" "activationThresold:"
  negative "ScaledObject with minReplicaCount > maxReplicaCount (the CRD's CEL rule)" crd_check "$so" "minReplicaCount: 1" "minReplicaCount: 13"
  xref_check() { "$py" "$work/check.py" xref "$1"; }
  negative "Deployment reading a Secret key that secret.yaml does not have" xref_check "$dep" "key: rabbitmq-url" "key: rabbitmq_url" dir
  negative "Deployment whose grace period is not above runtime.drain_timeout" xref_check "$dep" "terminationGracePeriodSeconds: 60" "terminationGracePeriodSeconds: 30" dir
  if [[ -n $promtool ]]; then
    negative "ScaledObject query with an unclosed parenthesis (promtool)" promql_check "$so" 'unit="records"}))' 'unit="records"})' dir
  fi
  negative "Deployment with an unknown field (terminationGracePeriod)" kv_check "$dep" "terminationGracePeriodSeconds: 60" "terminationGracePeriod: 60"
  negative "Deployment with an unknown field in a probe (httpGett)" kv_check "$dep" "httpGet:" "httpGett:"
  negative "Deployment with apiVersion apps/v2 (a schema-less kind only WARNs in kubernetes-validate)" kv_check "$dep" "apiVersion: apps/v1" "apiVersion: apps/v2"
  if [[ -n ${FLOWGATE_BIN:-} ]]; then
    flowgate_validate_exit "$neg_index"
    rc=$vrc
    if [[ $rc == 2 ]]; then
      ok "self-test: pipeline file with session_timout rejected: flowgate validate exit 2: $(grep -m1 '^✗' "$work/run-$neg_index/out" | sed 's/.*invalid configuration: //' | cut -c1-110)"
      rejected=$((rejected + 1))
    else
      fail "self-test: pipeline file with session_timout: flowgate validate exit $rc, expected 2"
      indent <"$work/run-$neg_index/out"
    fi
  fi
fi

echo "== $checked checks: $((checked - failures - warnings)) ok, $warnings warnings, $failures failed; $rejected broken copies rejected; $((SECONDS - started)) s"
((failures == 0))
