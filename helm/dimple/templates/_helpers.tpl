{{/*
Names, labels and the values derived from several keys (tensor-parallel degree, etcd
endpoints, worker addresses). Everything that two templates must agree on lives here.
*/}}

{{- define "dimple.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dimple.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dimple.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Component names stay under 63 characters with room for the StatefulSet pod suffix. */}}
{{- define "dimple.routerName" -}}
{{- printf "%s-router" (include "dimple.fullname" .) | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- define "dimple.workerName" -}}
{{- printf "%s-worker" (include "dimple.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- define "dimple.etcdName" -}}
{{- printf "%s-etcd" (include "dimple.fullname" .) | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- define "dimple.etcdHeadlessName" -}}
{{- printf "%s-headless" (include "dimple.etcdName" .) }}
{{- end }}

{{- define "dimple.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dimple.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dimple.labels" -}}
helm.sh/chart: {{ include "dimple.chart" . }}
{{ include "dimple.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dimple
{{- end }}

{{/* Usage: include "dimple.componentSelector" (list . "router") */}}
{{- define "dimple.componentSelector" -}}
{{ include "dimple.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "dimple.componentLabels" -}}
{{ include "dimple.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "dimple.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dimple.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dimple.cpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "dimple.cudaImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cuda" .Chart.AppVersion) .Values.image.cudaTag) }}
{{- end }}

{{/* GPU workers run the CUDA image; CPU workers and routers the CPU image. */}}
{{- define "dimple.workerImage" -}}
{{- if gt (int .Values.worker.gpus) 0 }}
{{- include "dimple.cudaImage" . }}
{{- else }}
{{- include "dimple.cpuImage" . }}
{{- end }}
{{- end }}

{{/* One worker pod is one tensor-parallel group: its GPU count is the TP degree. */}}
{{- define "dimple.tp" -}}
{{- max 1 (int .Values.worker.gpus) }}
{{- end }}

{{- define "dimple.dtype" -}}
{{- if .Values.worker.dtype }}
{{- .Values.worker.dtype }}
{{- else if gt (int .Values.worker.gpus) 0 }}
{{- "bf16" }}
{{- else }}
{{- "f32" }}
{{- end }}
{{- end }}

{{/*
Which discovery the cluster uses: "internal" (in-chart etcd), "external" (etcd endpoints from
values) or "static" (routers get the fixed list of worker addresses).
*/}}
{{- define "dimple.discovery" -}}
{{- if and .Values.etcd.enabled .Values.etcd.external.endpoints }}
{{- fail "etcd.enabled and etcd.external.endpoints exclude each other: set etcd.enabled=false to use an external etcd" }}
{{- else if .Values.etcd.enabled }}
{{- "internal" }}
{{- else if .Values.etcd.external.endpoints }}
{{- "external" }}
{{- else }}
{{- "static" }}
{{- end }}
{{- end }}

{{/*
etcd client endpoints, one per member so clients fail over on their own. `$(POD_NAMESPACE)`
is expanded by the kubelet from the container's downward-API variable, which keeps the
rendered manifests namespace-independent.
*/}}
{{- define "dimple.etcdEndpoints" -}}
{{- if eq (include "dimple.discovery" .) "internal" }}
{{- $etcd := include "dimple.etcdName" . }}
{{- $headless := include "dimple.etcdHeadlessName" . }}
{{- $port := int .Values.etcd.clientPort }}
{{- $urls := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $urls = append $urls (printf "http://%s-%d.%s.$(POD_NAMESPACE).svc:%d" $etcd $i $headless $port) }}
{{- end }}
{{- join "," $urls }}
{{- else if eq (include "dimple.discovery" .) "external" }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* Static worker list for routers when there is no etcd: every StatefulSet pod's stable name. */}}
{{- define "dimple.staticWorkers" -}}
{{- $worker := include "dimple.workerName" . }}
{{- $port := int .Values.worker.port }}
{{- $addrs := list }}
{{- range $i := until (int .Values.worker.replicas) }}
{{- $addrs = append $addrs (printf "%s-%d.%s.$(POD_NAMESPACE).svc:%d" $worker $i $worker $port) }}
{{- end }}
{{- join "," $addrs }}
{{- end }}

{{- define "dimple.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "dimple.fullname" .)) .Values.router.apiKeys.existingSecret }}
{{- end }}

{{/* The model volume, shared by the router and worker pod specs. */}}
{{- define "dimple.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" .Values.model.pvc.claimName }}
    {{- /* The download init container writes; the dimple containers mount it read-only. */}}
    readOnly: {{ not .Values.model.download.enabled }}
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ required "model.hostPath.path is required when model.source is hostPath" .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- end }}
{{- end }}

{{- define "dimple.modelMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- with .Values.model.subPath }}
  subPath: {{ . }}
{{- end }}
{{- end }}

{{/* Downward-API variables used by `$(...)` expansion in args. */}}
{{- define "dimple.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}

{{/* NetworkPolicy peers allowed to scrape metrics: configurable, default the whole namespace. */}}
{{- define "dimple.metricsPeers" -}}
{{- if .Values.networkPolicy.metricsFrom }}
{{- toYaml .Values.networkPolicy.metricsFrom }}
{{- else }}
- podSelector: {}
{{- end }}
{{- end }}

{{/*
Refuses `extraArgs` that repeat a flag the chart sets: the binary would refuse it at start
(or the later one would silently win). Usage:
  include "dimple.checkExtraArgs" (list "router.extraArgs" $args $extraArgs)
*/}}
{{- define "dimple.checkExtraArgs" -}}
{{- $key := index . 0 }}
{{- $owned := dict }}
{{- range (index . 1) }}
{{- $_ := set $owned (regexReplaceAll "=.*$" . "") true }}
{{- end }}
{{- range (index . 2) }}
{{- $flag := regexReplaceAll "[= ].*$" . "" }}
{{- if hasKey $owned $flag }}
{{- fail (printf "%s repeats %s, which the chart already sets from values: change the matching value instead" $key $flag) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Refuses a router whose listeners would share a port: the second bind fails at start. Usage:
  include "dimple.checkRouterPorts" .Values.router
*/}}
{{- define "dimple.checkRouterPorts" -}}
{{- $ports := dict "router.port" .port "router.metricsPort" .metricsPort "router.healthPort" .healthPort }}
{{- if .http.enabled }}
{{- $_ := set $ports "router.http.port" .http.port }}
{{- end }}
{{- $seen := dict }}
{{- range $name, $port := $ports }}
{{- $key := toString (int $port) }}
{{- if hasKey $seen $key }}
{{- fail (printf "%s and %s are both %s: each router listener needs its own port" (get $seen $key) $name $key) }}
{{- end }}
{{- $_ := set $seen $key $name }}
{{- end }}
{{- end }}

{{/*
Refuses a termination grace period that ends the drain early. Usage:
  include "dimple.checkDrain" (list "router" .Values.router)
*/}}
{{- define "dimple.checkDrain" -}}
{{- $name := index . 0 }}
{{- $v := index . 1 }}
{{- $needed := add (int $v.preStopSleepSeconds) (int $v.drainTimeoutSecs) }}
{{- if le (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must exceed %s.preStopSleepSeconds + %s.drainTimeoutSecs (%d): the kubelet would kill the pod before its drain ends" $name (int $v.terminationGracePeriodSeconds) $name $name (int $needed)) }}
{{- end }}
{{- end }}

{{/* Where routers and workers mount the secrets of optional TLS and etcd auth. */}}
{{- define "dimple.internalTlsDir" -}}/etc/dimple/internal-tls{{- end }}
{{- define "dimple.etcdTlsDir" -}}/etc/dimple/etcd-tls{{- end }}
{{- define "dimple.etcdAuthDir" -}}/etc/dimple/etcd-auth{{- end }}

{{/* Flags shared by routers and workers: internal mTLS and etcd client TLS/auth (a YAML list). */}}
{{- define "dimple.sharedSecurityArgs" -}}
{{- $args := list }}
{{- if .Values.internalTls.enabled }}
{{- $dir := include "dimple.internalTlsDir" . }}
{{- $args = concat $args (list (printf "--internal-tls-cert=%s/tls.crt" $dir) (printf "--internal-tls-key=%s/tls.key" $dir) (printf "--internal-tls-ca=%s/ca.crt" $dir)) }}
{{- end }}
{{- if ne (include "dimple.discovery" .) "static" }}
{{- $x := .Values.etcd.external }}
{{- if $x.tls.enabled }}
{{- $dir := include "dimple.etcdTlsDir" . }}
{{- $args = concat $args (list (printf "--etcd-ca=%s/ca.crt" $dir) (printf "--etcd-cert=%s/tls.crt" $dir) (printf "--etcd-key=%s/tls.key" $dir)) }}
{{- end }}
{{- if $x.auth.enabled }}
{{- $args = concat $args (list (printf "--etcd-user=%s" $x.auth.user) (printf "--etcd-password-file=%s/%s" (include "dimple.etcdAuthDir" .) $x.auth.secretKey)) }}
{{- end }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/* Volume mounts (a YAML list) of the secrets behind dimple.sharedSecurityArgs. */}}
{{- define "dimple.sharedSecurityMounts" -}}
{{- $m := list }}
{{- if .Values.internalTls.enabled }}
{{- $m = append $m (dict "name" "internal-tls" "mountPath" (include "dimple.internalTlsDir" .) "readOnly" true) }}
{{- end }}
{{- if ne (include "dimple.discovery" .) "static" }}
{{- if .Values.etcd.external.tls.enabled }}
{{- $m = append $m (dict "name" "etcd-tls" "mountPath" (include "dimple.etcdTlsDir" .) "readOnly" true) }}
{{- end }}
{{- if .Values.etcd.external.auth.enabled }}
{{- $m = append $m (dict "name" "etcd-auth" "mountPath" (include "dimple.etcdAuthDir" .) "readOnly" true) }}
{{- end }}
{{- end }}
{{- toYaml $m }}
{{- end }}

{{- define "dimple.sharedSecurityVolumes" -}}
{{- $v := list }}
{{- if .Values.internalTls.enabled }}
{{- $v = append $v (dict "name" "internal-tls" "secret" (dict "secretName" (required "internalTls.secretName is required when internalTls.enabled" .Values.internalTls.secretName) "defaultMode" 288)) }}
{{- end }}
{{- if ne (include "dimple.discovery" .) "static" }}
{{- $x := .Values.etcd.external }}
{{- if $x.tls.enabled }}
{{- $v = append $v (dict "name" "etcd-tls" "secret" (dict "secretName" (required "etcd.external.tls.secretName is required when etcd.external.tls.enabled" $x.tls.secretName) "defaultMode" 288)) }}
{{- end }}
{{- if $x.auth.enabled }}
{{- $v = append $v (dict "name" "etcd-auth" "secret" (dict "secretName" (required "etcd.external.auth.secretName is required when etcd.external.auth.enabled" $x.auth.secretName) "defaultMode" 288 "items" (list (dict "key" $x.auth.secretKey "path" $x.auth.secretKey)))) }}
{{- end }}
{{- end }}
{{- toYaml $v }}
{{- end }}

{{/* A preStop hook that sleeps, when seconds > 0 (exec `sleep`: works on every supported Kubernetes version). */}}
{{- define "dimple.preStop" -}}
{{- if gt (int .) 0 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ int . }}"]
{{- end }}
{{- end }}

{{/* gRPC health probe on the health port for a service name ("" = liveness). */}}
{{- define "dimple.grpcProbe" -}}
grpc:
  port: {{ index . 0 }}
  service: {{ index . 1 | quote }}
{{- end }}

{{/* Whether routers read prompt assets from the model volume (else: from workers, or built in). */}}
{{- define "dimple.routerMountsModel" -}}
{{- if and (ne .Values.model.source "none") (eq .Values.router.promptAssets "modelVolume") }}true{{ end }}
{{- end }}

{{/*
The model download init container of worker pods. It writes into <volume>/<subPath>, marks a
finished download with the source it came from (a pod restart, or another pod on a shared
volume, then skips it), and serialises pods on a shared volume with a lock directory whose
age is refreshed while the download runs (a lock left by a killed pod goes stale).
*/}}
{{- define "dimple.downloadContainer" -}}
{{- $m := .Values.model }}
{{- $d := $m.download }}
{{- $id := "" }}
{{- $fetch := "" }}
{{- $image := $d.image }}
{{- if eq $d.from "huggingface" }}
{{- $id = printf "huggingface:%s@%s" $d.repo $d.revision }}
{{- $image = default "python:3.12-slim" $d.image }}
{{- $fetch = printf "pip install --quiet --no-cache-dir --target /tmp/dl/py 'huggingface_hub==%s'\nPYTHONPATH=/tmp/dl/py python3 -c 'import os; from huggingface_hub import snapshot_download; snapshot_download(repo_id=os.environ[\"REPO\"], revision=os.environ[\"REVISION\"], local_dir=os.environ[\"DEST\"])'" $d.huggingfaceHubVersion }}
{{- else if eq $d.from "s3" }}
{{- $id = printf "s3:%s" $d.uri }}
{{- $image = default "amazon/aws-cli:2.15.55" $d.image }}
{{- $fetch = "aws s3 sync --only-show-errors \"$URI\" \"$DEST\"" }}
{{- else }}
{{- $id = printf "gcs:%s" $d.uri }}
{{- $image = default "gcr.io/google.com/cloudsdktool/google-cloud-cli:slim" $d.image }}
{{- $fetch = "gcloud storage rsync --recursive \"$URI\" \"$DEST\"" }}
{{- end }}
- name: model-download
  image: {{ $image }}
  imagePullPolicy: IfNotPresent
  {{- if $d.command }}
  command:
    {{- toYaml $d.command | nindent 4 }}
  {{- else }}
  command:
    - sh
    - -c
    - |
      set -eu
      mkdir -p "$DEST"
      done_file="$DEST/.dimple-download-complete"
      lock="$DEST/.dimple-download.lock"
      if [ "$(cat "$done_file" 2>/dev/null)" = "$SOURCE_ID" ]; then
        echo "model from $SOURCE_ID already in $DEST"; exit 0
      fi
      until mkdir "$lock" 2>/dev/null; do
        if [ "$(cat "$done_file" 2>/dev/null)" = "$SOURCE_ID" ]; then exit 0; fi
        if [ -n "$(find "$lock" -maxdepth 0 -mmin +10 2>/dev/null)" ]; then
          echo "removing a stale download lock"; rmdir "$lock" 2>/dev/null || true; continue
        fi
        echo "another pod is downloading into $DEST; waiting"; sleep 15
      done
      ( while sleep 60; do touch "$lock"; done ) >/dev/null 2>&1 & keepalive=$!
      trap 'kill $keepalive 2>/dev/null; rmdir "$lock" 2>/dev/null || true' EXIT
      if [ "$(cat "$done_file" 2>/dev/null)" = "$SOURCE_ID" ]; then
        echo "model from $SOURCE_ID downloaded by another pod"; exit 0
      fi
      rm -f "$done_file"
      echo "downloading $SOURCE_ID into $DEST"
      {{- $fetch | nindent 6 }}
      test -f "$DEST/config.json" || { echo "no config.json in $DEST after the download" >&2; exit 1; }
      echo "$SOURCE_ID" > "$done_file"
      echo "download complete"
  {{- end }}
  env:
    - name: DEST
      value: {{ printf "/model-volume/%s" $m.subPath | trimSuffix "/" | quote }}
    - name: SOURCE_ID
      value: {{ $id | quote }}
    - name: REPO
      value: {{ $d.repo | quote }}
    - name: REVISION
      value: {{ $d.revision | quote }}
    - name: URI
      value: {{ $d.uri | quote }}
    - name: HOME
      value: /tmp/dl
    - name: TMPDIR
      value: /tmp/dl
    - name: HF_HOME
      value: /tmp/dl/hf
    {{- with $d.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $d.secretName }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  resources:
    {{- toYaml $d.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: /model-volume
    - name: download-tmp
      mountPath: /tmp/dl
{{- end }}
