{{/* Names and labels. */}}
{{- define "icgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "icgate.fullname" -}}
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

{{- define "icgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "icgate.labels" -}}
{{ include "icgate.componentLabels" (dict "ctx" . "component" "gateway") }}
{{- end }}

{{/* The labels of one part of the release: (dict "ctx" . "component" "migrations"). */}}
{{- define "icgate.componentLabels" -}}
helm.sh/chart: {{ include "icgate.chart" .ctx }}
{{ include "icgate.componentSelectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{- define "icgate.componentSelectorLabels" -}}
app.kubernetes.io/name: {{ include "icgate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The gateway's pods; the trial PostgreSQL and Redis have their own component label. */}}
{{- define "icgate.selectorLabels" -}}
{{ include "icgate.componentSelectorLabels" (dict "ctx" . "component" "gateway") }}
{{- end }}

{{- define "icgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "icgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "icgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Where the gateway reads its policy and keeps its state (the `--policy` and `--data-dir` of every command). */}}
{{- define "icgate.policyDir" -}}/etc/icgate{{- end }}
{{- define "icgate.policyPath" -}}/etc/icgate/policy.yaml{{- end }}
{{- define "icgate.dataDir" -}}/var/lib/icgate{{- end }}

{{/* The policy file's text: the `policy` value as YAML. */}}
{{- define "icgate.policyYaml" -}}
{{- if not .Values.policy }}
{{- fail "icgate: `policy` is empty; the gateway needs a policy with at least one backend" }}
{{- end }}
{{- toYaml .Values.policy }}
{{- end }}

{{/* The gateway's own drain (`server.graceful_shutdown_s`, the policy's default 30). */}}
{{- define "icgate.gracefulShutdownSeconds" -}}
{{- $server := (get .Values.policy "server") | default dict }}
{{- if hasKey $server "graceful_shutdown_s" }}{{ get $server "graceful_shutdown_s" }}{{ else }}30{{ end }}
{{- end }}

{{/*
The pod's grace period: the preStop pause (the Service stops sending first), then the gateway's drain, then
its cut margin (gateway/api/drain.py: CUT_MARGIN_S = 5 s, for the cut requests' last bytes and log rows),
then time to flush the request log and exit. Kubernetes kills the pod when it runs out.
*/}}
{{- define "icgate.terminationGracePeriodSeconds" -}}
{{- if .Values.terminationGracePeriodSeconds }}
{{- .Values.terminationGracePeriodSeconds }}
{{- else }}
{{- $drain := include "icgate.gracefulShutdownSeconds" . | float64 | ceil | int }}
{{- add .Values.lifecycle.preStopSleepSeconds $drain 5 .Values.lifecycle.exitMarginSeconds }}
{{- end }}
{{- end }}

{{/* The environment variable the console's admin key is read from (the policy's `admin.key_env`). */}}
{{- define "icgate.adminKeyEnv" -}}
{{- $admin := (get .Values.policy "admin") | default dict }}
{{- get $admin "key_env" | default "ICGATE_ADMIN_KEY" }}
{{- end }}

{{/* The chart's own Secret for the gateway: made unless every value it would hold comes from elsewhere. */}}
{{- define "icgate.secretName" -}}
{{- include "icgate.fullname" . }}
{{- end }}

{{/* Whether the chart's Secret holds anything (then it is rendered). */}}
{{- define "icgate.chartSecretNeeded" -}}
{{- $v := .Values }}
{{- $own := and (not $v.secret.existingSecret) (or $v.secret.adminKey $v.secret.providerKeys) }}
{{- $db := and (not $v.externalDatabase.existingSecret) (or $v.externalDatabase.url $v.postgresql.enabled) }}
{{- $redis := and (not $v.externalRedis.existingSecret) (or $v.externalRedis.url $v.redis.enabled) }}
{{- if or $own $db $redis }}true{{ end }}
{{- end }}

{{/*
The database URL as a secretKeyRef (name and key), or nothing when the policy's `database.url` names it.
PostgreSQL is required: an SQLite file in a pod's scratch volume would be lost with the pod and would not
be shared by the replicas.
*/}}
{{- define "icgate.databaseSecretRef" -}}
{{- $v := .Values }}
{{- if and $v.postgresql.enabled (or $v.externalDatabase.url $v.externalDatabase.existingSecret) }}
{{- fail "icgate: set either postgresql.enabled (the trial database) or externalDatabase, not both" }}
{{- end }}
{{- if $v.externalDatabase.existingSecret }}
name: {{ $v.externalDatabase.existingSecret }}
key: {{ $v.externalDatabase.existingSecretKey }}
{{- else if or $v.externalDatabase.url $v.postgresql.enabled }}
name: {{ include "icgate.secretName" . }}
key: database-url
{{- else if not (get ((get $v.policy "database") | default dict) "url") }}
{{- fail "icgate: no database: set externalDatabase.url or externalDatabase.existingSecret (PostgreSQL), or postgresql.enabled=true for a trial" }}
{{- end }}
{{- end }}

{{/* The Redis URL as a secretKeyRef, or nothing when Redis is not configured. */}}
{{- define "icgate.redisSecretRef" -}}
{{- $v := .Values }}
{{- if and $v.redis.enabled (or $v.externalRedis.url $v.externalRedis.existingSecret) }}
{{- fail "icgate: set either redis.enabled (the trial Redis) or externalRedis, not both" }}
{{- end }}
{{- if $v.externalRedis.existingSecret }}
name: {{ $v.externalRedis.existingSecret }}
key: {{ $v.externalRedis.existingSecretKey }}
{{- else if or $v.externalRedis.url $v.redis.enabled }}
name: {{ include "icgate.secretName" . }}
key: redis-url
{{- end }}
{{- end }}

{{/* The gateway's environment: offline models, secrets by reference only. Shared by the pods and the migration Job. */}}
{{- define "icgate.env" -}}
- name: HF_HUB_OFFLINE
  value: "1"
- name: HOME
  value: /tmp
- name: ICGATE_DATA_DIR
  value: {{ include "icgate.dataDir" . }}
{{- with (include "icgate.databaseSecretRef" . | trim) }}
- name: ICGATE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- . | nindent 6 }}
{{- end }}
{{- with (include "icgate.redisSecretRef" . | trim) }}
- name: ICGATE_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- . | nindent 6 }}
{{- end }}
{{- end }}

{{/* Keys only the serving pods need: the console's admin key and the providers' keys. */}}
{{- define "icgate.keyEnv" -}}
{{- $v := .Values }}
{{- if $v.secret.existingSecret }}
- name: {{ include "icgate.adminKeyEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.secret.existingSecret }}
      key: {{ $v.secret.adminKeyKey }}
      optional: true
{{- range $v.secret.providerKeyNames }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.secret.existingSecret }}
      key: {{ . }}
{{- end }}
{{- else }}
{{- if $v.secret.adminKey }}
- name: {{ include "icgate.adminKeyEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "icgate.secretName" . }}
      key: admin-key
{{- end }}
{{- range $name, $_ := $v.secret.providerKeys }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "icgate.secretName" $ }}
      key: {{ $name }}
{{- end }}
{{- end }}
{{- end }}

{{- define "icgate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "icgate.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}
