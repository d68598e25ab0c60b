{{- define "tern.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tern.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tern.labels" -}}
{{ include "tern.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tern.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Labels of one part in distributed mode: the selector labels plus its component. */}}
{{- define "tern.componentLabels" -}}
{{ include "tern.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The config file the container reads. */}}
{{- define "tern.configFile" -}}
{{ if .Values.config }}/etc/tern/custom/tern.toml{{ else }}/etc/tern/tern.toml{{ end }}
{{- end -}}

{{/* The store token Secret (distributed mode). */}}
{{- define "tern.storeSecret" -}}
{{ .Values.store.existingSecret | default (printf "%s-store-token" (include "tern.fullname" .)) }}
{{- end -}}

{{/* The operator token Secret (distributed mode). */}}
{{- define "tern.operatorSecret" -}}
{{ .Values.operatorToken.existingSecret | default (printf "%s-operator-token" (include "tern.fullname" .)) }}
{{- end -}}

{{/* Environment every Tern container gets: ports, logging, TLS, the shared backends.
Takes (dict "root" $ "component" NAME); the dashboard gets no store credentials. */}}
{{- define "tern.env" -}}
{{- $component := .component -}}
{{- with .root -}}
- name: TERN_LOG__LEVEL
  value: {{ .Values.log.level | quote }}
- name: TERN_LOG__FORMAT
  value: {{ .Values.log.format | quote }}
{{- range $name, $port := .Values.ports }}
- name: TERN_{{ upper $name }}_PORT
  value: {{ $port | quote }}
{{- end }}
{{- with .Values.publicUrl }}
- name: TERN_IDENTITY__PUBLIC_URL
  value: {{ . | quote }}
{{- end }}
{{- if .Values.tls.secretName }}
- name: TERN_MQTT__TLS__CERT_FILE
  value: /etc/tern/tls/tls.crt
- name: TERN_MQTT__TLS__KEY_FILE
  value: /etc/tern/tls/tls.key
{{- end }}
{{- with .Values.kafka }}
{{- if .brokers }}
- name: TERN_EVENTLOG__BACKEND
  value: kafka
- name: TERN_EVENTLOG__KAFKA__BROKERS
  value: {{ .brokers | quote }}
- name: TERN_EVENTLOG__KAFKA__NAMESPACE
  value: {{ .namespace | quote }}
- name: TERN_EVENTLOG__KAFKA__CREATE_TOPICS
  value: {{ .createTopics | quote }}
- name: TERN_EVENTLOG__KAFKA__PARTITIONS
  value: {{ .partitions | quote }}
- name: TERN_EVENTLOG__KAFKA__REPLICATION_FACTOR
  value: {{ .replicationFactor | quote }}
- name: TERN_EVENTLOG__KAFKA__RETENTION_HOURS
  value: {{ .retentionHours | quote }}
{{- end }}
{{- end }}
{{- if .Values.nats.url }}
- name: TERN_ROUTING__BACKEND
  value: nats
- name: TERN_ROUTING__NATS__URL
  value: {{ .Values.nats.url | quote }}
- name: TERN_ROUTING__NATS__SUBJECT_PREFIX
  value: {{ .Values.nats.subjectPrefix | quote }}
{{- if .Values.nats.tokenSecret }}
- name: TERN_ROUTING__NATS__TOKEN_FILE
  value: /etc/tern/nats-token/token
{{- end }}
{{- if .Values.nats.tlsSecret }}
- name: TERN_ROUTING__NATS__CA_FILE
  value: /etc/tern/nats-tls/ca.crt
{{- if .Values.nats.clientCertificate }}
- name: TERN_ROUTING__NATS__CERT_FILE
  value: /etc/tern/nats-tls/tls.crt
- name: TERN_ROUTING__NATS__KEY_FILE
  value: /etc/tern/nats-tls/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.mode "distributed") (ne $component "dashboard") }}
- name: TERN_STORE__URL
  value: {{ printf "%s://%s-store:%v" (ternary "https" "http" (ne .Values.store.tls.serverSecret "")) (include "tern.fullname" .) .Values.store.port | quote }}
- name: TERN_STORE__TOKEN_FILE
  value: /etc/tern/store/token
{{- if .Values.store.tls.serverSecret }}
- name: TERN_STORE__CA_FILE
  value: /etc/tern/store-tls/ca.crt
{{- if .Values.store.tls.clientSecret }}
- name: TERN_STORE__CERT_FILE
  value: /etc/tern/store-tls/tls.crt
- name: TERN_STORE__KEY_FILE
  value: /etc/tern/store-tls/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.tracing.otlpEndpoint }}
- name: TERN_TRACING__OTLP_ENDPOINT
  value: {{ .Values.tracing.otlpEndpoint | quote }}
- name: TERN_TRACING__SAMPLING_RATIO
  value: {{ .Values.tracing.samplingRatio | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The container's security context: read-only root, no capabilities. */}}
{{- define "tern.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Pod placement and identity shared by every pod. */}}
{{- define "tern.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
automountServiceAccountToken: false
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The NATS token and TLS Secrets, as volume mounts (`tern.natsVolumes` names them). */}}
{{- define "tern.natsMounts" -}}
{{- if .Values.nats.url }}
{{- if .Values.nats.tokenSecret }}
- name: nats-token
  mountPath: /etc/tern/nats-token
  readOnly: true
{{- end }}
{{- if .Values.nats.tlsSecret }}
- name: nats-tls
  mountPath: /etc/tern/nats-tls
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{- define "tern.natsVolumes" -}}
{{- if .Values.nats.url }}
{{- if .Values.nats.tokenSecret }}
- name: nats-token
  secret:
    secretName: {{ .Values.nats.tokenSecret }}
    items:
      - key: token
        path: token
{{- end }}
{{- if .Values.nats.tlsSecret }}
- name: nats-tls
  secret:
    secretName: {{ .Values.nats.tlsSecret }}
    {{- if not .Values.nats.clientCertificate }}
    items:
      - key: ca.crt
        path: ca.crt
    {{- end }}
{{- end }}
{{- end }}
{{- end }}
