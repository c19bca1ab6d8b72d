{{- define "sae-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sae-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "sae-serve.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "sae-serve.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "sae-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sae-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sae-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{ include "sae-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret holding the API keys, or "" when there are none. */}}
{{- define "sae-serve.apiKeySecret" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.values }}{{ include "sae-serve.fullname" . }}-api-keys
{{- end }}
{{- end }}

{{/* The names of the API keys inside that Secret. */}}
{{- define "sae-serve.apiKeyNames" -}}
{{- if .Values.apiKeys.existingSecret }}{{ toJson .Values.apiKeys.secretKeys }}
{{- else }}{{ $names := list }}{{ range $i, $_ := .Values.apiKeys.values }}{{ $names = append $names (printf "key-%d" $i) }}{{ end }}{{ toJson $names }}
{{- end }}
{{- end }}

{{/*
vLLM's --gpu-memory-utilization: the pod's budget minus the top-k readout workspace that vLLM's
profiling cannot see (maxNumBatchedTokens x the largest d_sae x dtype bytes). SAE weights need no
term here: they load with the model and vLLM counts them as weights.
*/}}
{{- define "sae-serve.readoutWorkspaceBytes" -}}
{{- $largest := 0 }}
{{- range .Values.saes }}{{ $largest = max $largest (mul .dSae .dtypeBytes) }}{{ end }}
{{- mul .Values.maxNumBatchedTokens $largest }}
{{- end }}

{{- define "sae-serve.saeWeightBytes" -}}
{{- $total := 0 }}
{{- range .Values.saes }}{{ $total = add $total (mul 2 .dModel .dSae .dtypeBytes) }}{{ end }}
{{- $total }}
{{- end }}

{{- define "sae-serve.gpuMemoryUtilization" -}}
{{- $gpuBytes := mulf .Values.gpu.memoryGiB 1073741824 }}
{{- $workspace := float64 (include "sae-serve.readoutWorkspaceBytes" .) }}
{{- $utilization := subf .Values.gpu.memoryUtilization (divf $workspace $gpuBytes) }}
{{- if le $utilization 0.05 }}
{{- fail (printf "gpu.memoryUtilization %v leaves no room for the readout workspace (%v bytes): raise it, or lower maxNumBatchedTokens" .Values.gpu.memoryUtilization $workspace) }}
{{- end }}
{{- printf "%.4f" $utilization }}
{{- end }}

{{/* The SHA256SUMS file checked before the server starts ("" when no checksum is given). */}}
{{- define "sae-serve.checksums" -}}
{{- range .Values.saes }}{{ $dir := .path }}{{ range $file, $sum := .sha256 }}
{{ $sum }}  {{ $dir }}/{{ $file }}
{{- end }}{{ end }}
{{- end }}
