/*
 * service: `tributary serve`. Wires the parts together in the order of an
 * event's way (http_in -> ingest -> queue -> sender), handles signals (SIGTERM
 * and SIGINT stop, SIGHUP reloads) and shuts down in the reverse order: stop
 * accepting (503), finish requests in progress, let the sender finish its
 * in-flight requests within a bound, close the queue.
 */
#ifndef TRIBUTARY_SERVICE_H
#define TRIBUTARY_SERVICE_H

/* Runs until a stop signal; returns the process exit code. */
int service_run(const char *config_path);

#endif
