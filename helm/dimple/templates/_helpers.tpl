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
    readOnly: true
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
