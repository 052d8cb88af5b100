/*
 * dlq: the operator's commands on the stored data, run against data_dir while
 * the service runs or not.
 *
 *   tributary dlq list [--reason R] [--limit N] [--json]
 *   tributary dlq show ID [--json]
 *   tributary dlq requeue ID | --reason R | --all
 *   tributary dlq purge --older-than DURATION [--reason R]
 *   tributary queue stats [--json]
 *   tributary queue names [--json]       the event names sent to mParticle
 *   tributary queue forget-names NAME... | --all
 *
 * requeue runs each dead letter's Braze event through the rules in force now
 * (a fixed rule or renewed credentials recover it) and stores the result in
 * the same transaction that removes the dead letter, a page of dead letters
 * at a time: its memory is bounded by the page, not by the store.
 */
#ifndef TRIBUTARY_DLQ_H
#define TRIBUTARY_DLQ_H

struct cli_options {
    const char *config;
    const char *const *args; /* positional arguments after the command */
    int nargs;
    const char *reason;
    const char *older_than;
    const char *limit;
    int all;
    int json;
    int force; /* dlq requeue: route with this command's credentials */
};

int dlq_main(const struct cli_options *o);
int queue_main(const struct cli_options *o);

#endif
