/* loadgen: the load generator of the tributary benchmark (scripts/bench.sh).
 *
 *   loadgen closed --url URL --token T [--conns 16] [--seconds 20] [common]
 *       closed loop: CONNS keep-alive connections, each sends its next request
 *       as soon as the previous one is answered, for SECONDS.
 *   loadgen rate --url URL --token T [--rate 200] [--seconds 15] [common]
 *       open loop: RATE requests per second at fixed scheduled times for
 *       SECONDS; a new connection is opened whenever every open one is busy.
 *       Latency runs from a request's scheduled send time to its answer, so
 *       queueing delay counts (no coordinated omission).
 *   loadgen dump [--requests N] [common]       the bodies, one per line (NDJSON)
 *   loadgen get URL                            prints the body; exit 0 on 200
 *   loadgen freeport                           prints a free loopback TCP port
 *
 * common: --events 100 (per request)  --users 8000  --templates 200
 *         --seed 1  --tag 1 (0..65535, part of every event id: one per phase)
 *         --timeout 30 (seconds to wait for requests in flight at the end)
 *         --ids random|sequential (default random: the 12 hex digits of each id
 *           are a bijection of the sequence number, so ids are unique but
 *           unordered like Braze's UUIDs; sequential makes them ascend)
 *         --latency-log FILE (closed, rate: one line per answer: scheduled
 *           time in s since the start, latency in ms, HTTP status)
 *
 * Bodies are Braze Currents envelopes of realistic events (~1 KB each, the 54
 * mapped event types weighted towards email, push, SMS and Content Cards,
 * platforms ios/android/web/none). TEMPLATES bodies are generated before the
 * timed phase; each request copies one and writes a fresh sequence number into
 * the fixed-width hex tail of its 100 event ids, so every event id is unique
 * (run nonce + tag + sequence) and no JSON is built while the clock runs.
 *
 * closed and rate print `name value` lines on stdout; progress and error
 * details go to stderr:
 *   requests, ok_requests (200), ok_events (events in them), forwarded_events
 *   and duplicates (summed from the 200 answers), errors (non-200, transport
 *   failures and requests unanswered --timeout s after the end), status_NNN,
 *   transport_errors, unanswered, connections (TCP connections opened),
 *   max_in_flight, start_ms / end_ms (wall clock of the first send and last
 *   answer), duration_s, events_per_s (ok_events / duration_s), cpu_s and
 *   cpu_user_s (the loadgen's own), latency_{p50,p90,p99,p999,max}_ms (of the
 *   200s, from the scheduled send time; in closed mode the response time).
 */

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---- small helpers --------------------------------------------------------- */

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static double mono_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int64_t wall_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

/* xorshift64* */
static uint64_t rng_state = 88172645463325252ull;

static uint64_t rnd(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static unsigned rnd_below(unsigned n)
{
    return (unsigned)(rnd() % n);
}

static const char *pick(const char *const *v, size_t n)
{
    return v[rnd_below((unsigned)n)];
}
#define PICK(arr) pick(arr, sizeof(arr) / sizeof(arr[0]))

/* A growable string. */
typedef struct {
    char *p;
    size_t len, cap;
} sb;

static void sb_grow(sb *b, size_t more)
{
    if (b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more + 1)
        cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static void sb_printf(sb *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            die("vsnprintf failed");
        if (b->p && (size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        sb_grow(b, (size_t)n);
    }
}

static void hex_uuid(char out[37])
{
    uint64_t a = rnd(), b = rnd();
    snprintf(out, 37, "%08x-%04x-4%03x-%04x-%012llx", (unsigned)(a >> 32),
             (unsigned)(a >> 16) & 0xffff, (unsigned)a & 0xfff,
             0x8000u | ((unsigned)(b >> 48) & 0x3fff), (unsigned long long)(b & 0xffffffffffffull));
}

static void hex_n(char *out, int n)
{
    static const char H[] = "0123456789abcdef";
    for (int i = 0; i < n; i++)
        out[i] = H[rnd_below(16)];
    out[n] = '\0';
}

/* ---- realistic Currents events --------------------------------------------- */

enum platform { P_IOS, P_ANDROID, P_WEB };

struct user {
    char external_id[32];
    char user_id[25];
    char device_id[37];
    char ad_id[37];
    char push_token[80];
    char email[48];
    char phone[16];
    const char *timezone;
    const char *device_model;
    const char *os_version;
    enum platform platform;
};

/* A campaign or Canvas step with its ids, shared by many events. */
struct campaign {
    int canvas;
    char id[37], variation_id[37], step_id[37], app_group_id[37];
    char name[96], variation_name[64], step_name[64];
};

enum category {
    C_EMAIL,
    C_PUSH,
    C_SMS,
    C_CARD,
    C_INAPP,
    C_NEWSFEED,
    C_CANVAS,
    C_CAMPAIGN,
    C_WEBHOOK,
    C_WHATSAPP,
    C_SUBSCRIPTION,
    C_UNINSTALL
};

struct etype {
    const char *name;
    enum category cat;
    int weight;
};

/* The 54 mapped types; weights favour email, push, SMS and Content Cards. */
static const struct etype TYPES[] = {
    {"users.messages.email.Send", C_EMAIL, 90},
    {"users.messages.email.Delivery", C_EMAIL, 85},
    {"users.messages.email.Open", C_EMAIL, 60},
    {"users.messages.email.Click", C_EMAIL, 25},
    {"users.messages.email.Bounce", C_EMAIL, 4},
    {"users.messages.email.SoftBounce", C_EMAIL, 4},
    {"users.messages.email.Unsubscribe", C_EMAIL, 3},
    {"users.messages.email.MarkAsSpam", C_EMAIL, 1},
    {"users.messages.email.Abort", C_EMAIL, 3},
    {"users.messages.pushnotification.Send", C_PUSH, 110},
    {"users.messages.pushnotification.Open", C_PUSH, 30},
    {"users.messages.pushnotification.Bounce", C_PUSH, 6},
    {"users.messages.pushnotification.Abort", C_PUSH, 3},
    {"users.messages.sms.Send", C_SMS, 35},
    {"users.messages.sms.CarrierSend", C_SMS, 30},
    {"users.messages.sms.Delivery", C_SMS, 30},
    {"users.messages.sms.DeliveryFailure", C_SMS, 2},
    {"users.messages.sms.Rejection", C_SMS, 2},
    {"users.messages.sms.InboundReceive", C_SMS, 4},
    {"users.messages.sms.ShortLinkClick", C_SMS, 6},
    {"users.messages.sms.Abort", C_SMS, 2},
    {"users.messages.contentcard.Send", C_CARD, 45},
    {"users.messages.contentcard.Impression", C_CARD, 45},
    {"users.messages.contentcard.Click", C_CARD, 12},
    {"users.messages.contentcard.Dismiss", C_CARD, 8},
    {"users.messages.contentcard.Abort", C_CARD, 2},
    {"users.messages.inappmessage.Impression", C_INAPP, 12},
    {"users.messages.inappmessage.Click", C_INAPP, 4},
    {"users.messages.inappmessage.Abort", C_INAPP, 1},
    {"users.messages.newsfeedcard.Impression", C_NEWSFEED, 2},
    {"users.messages.newsfeedcard.Click", C_NEWSFEED, 1},
    {"users.messages.newsfeedcard.Abort", C_NEWSFEED, 1},
    {"users.behaviors.app.NewsFeedImpression", C_NEWSFEED, 1},
    {"users.canvas.Entry", C_CANVAS, 10},
    {"users.canvas.Conversion", C_CANVAS, 3},
    {"users.canvas.Abort", C_CANVAS, 1},
    {"users.canvas.exit.MatchedAudience", C_CANVAS, 2},
    {"users.canvas.exit.PerformedEvent", C_CANVAS, 2},
    {"users.canvas.experimentstep.Conversion", C_CANVAS, 1},
    {"users.canvas.experimentstep.SplitEntry", C_CANVAS, 2},
    {"users.campaigns.Conversion", C_CAMPAIGN, 3},
    {"users.campaigns.EnrollInControl", C_CAMPAIGN, 2},
    {"users.campaigns.Abort", C_CAMPAIGN, 1},
    {"users.messages.webhook.Send", C_WEBHOOK, 5},
    {"users.messages.webhook.Abort", C_WEBHOOK, 1},
    {"users.messages.whatsapp.Send", C_WHATSAPP, 4},
    {"users.messages.whatsapp.Delivery", C_WHATSAPP, 4},
    {"users.messages.whatsapp.Read", C_WHATSAPP, 3},
    {"users.messages.whatsapp.Failure", C_WHATSAPP, 1},
    {"users.messages.whatsapp.InboundReceive", C_WHATSAPP, 1},
    {"users.messages.whatsapp.Abort", C_WHATSAPP, 1},
    {"users.behaviors.subscription.GlobalStateChange", C_SUBSCRIPTION, 2},
    {"users.behaviors.subscriptiongroup.StateChange", C_SUBSCRIPTION, 3},
    {"users.behaviors.Uninstall", C_UNINSTALL, 2},
};
#define NTYPES (sizeof(TYPES) / sizeof(TYPES[0]))

static const struct etype *pick_type(void)
{
    static int total;
    if (!total)
        for (size_t i = 0; i < NTYPES; i++)
            total += TYPES[i].weight;
    int r = (int)rnd_below((unsigned)total);
    for (size_t i = 0; i < NTYPES; i++) {
        if (r < TYPES[i].weight)
            return &TYPES[i];
        r -= TYPES[i].weight;
    }
    return &TYPES[0];
}

static const char *const TIMEZONES[] = {
    "America/New_York",  "America/Chicago", "America/Los_Angeles", "Europe/Berlin",
    "Europe/London",     "Europe/Paris",    "Asia/Tokyo",          "Australia/Sydney",
    "America/Sao_Paulo", "Asia/Kolkata"};
static const char *const IOS_MODELS[] = {"iPhone15,2", "iPhone14,5", "iPhone16,1", "iPhone13,2",
                                         "iPad13,4"};
static const char *const IOS_VERSIONS[] = {"iOS 17.6.1", "iOS 18.1", "iOS 16.7.10", "iOS 18.0.1"};
static const char *const ANDROID_MODELS[] = {"SM-G991B", "Pixel 8", "Pixel 7a", "SM-A536B",
                                             "moto g power (2022)"};
static const char *const ANDROID_VERSIONS[] = {"Android 14", "Android 13", "Android 12"};
static const char *const WEB_MODELS[] = {"Macintosh", "Windows", "Linux x86_64"};
static const char *const WEB_VERSIONS[] = {"Mac OS X 14.5", "Windows 10", "Chrome OS"};
static const char *const USER_AGENTS[] = {
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Mobile/15E148",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/129.0.6668.100 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Safari/605.1.15"};
static const char *const CAMPAIGN_NAMES[] = {
    "Winter sale 2026 - 30% off outerwear - returning customers",
    "Onboarding day 3 - finish your profile and unlock free shipping",
    "Abandoned cart reminder (high intent, 24h) - EU",
    "Weekly digest - personalised recommendations - newsletter subscribers",
    "Price drop alert on wishlist items - mobile first",
    "Win-back: we miss you - 90 day lapsed - coupon WELCOME15",
    "Order shipped - transactional - tracking link",
    "Black Friday early access - loyalty tier gold and platinum"};
static const char *const VARIATION_NAMES[] = {"Variant A (control copy)",
                                              "Variant B (emoji subject)", "Variant C (short copy)",
                                              "Control group"};
static const char *const STEP_NAMES[] = {"Entry message", "Wait 1 day then push",
                                         "Decision split: opened?", "Follow-up email",
                                         "Final reminder"};
static const char *const LINK_ALIASES[] = {"hero_banner_cta", "footer_unsubscribe",
                                           "product_grid_item_3", "view_in_browser"};
static const char *const BOUNCE_REASONS[] = {
    "550 5.1.1 The email account that you tried to reach does not exist",
    "552 5.2.2 The recipient's mailbox is full and can't accept messages now",
    "421 4.7.0 Temporary System Problem. Try again later"};
static const char *const SMS_BODIES[] = {
    "Your order #48213 has shipped! Track it here: https://brz.ai/x7Kq2 Reply STOP to opt out",
    "Flash sale: 25% off everything today only. Shop now https://brz.ai/p9Lm4 STOP to end",
    "Your verification code is 482913. It expires in 10 minutes."};

static void make_user(struct user *u, unsigned idx)
{
    snprintf(u->external_id, sizeof u->external_id, "customer-%07u", idx * 7919u % 10000000u);
    hex_n(u->user_id, 24);
    hex_uuid(u->device_id);
    for (char *p = u->device_id; *p; p++)
        if (*p >= 'a' && *p <= 'f')
            *p = (char)(*p - 'a' + 'A');
    hex_uuid(u->ad_id);
    hex_n(u->push_token, 64);
    snprintf(u->email, sizeof u->email, "user%u.%s@example.com", idx, u->user_id + 18);
    snprintf(u->phone, sizeof u->phone, "+1555%07u", (idx * 104729u) % 10000000u);
    u->timezone = PICK(TIMEZONES);
    unsigned r = rnd_below(100);
    u->platform = r < 45 ? P_IOS : r < 85 ? P_ANDROID : P_WEB;
    if (u->platform == P_IOS) {
        u->device_model = PICK(IOS_MODELS);
        u->os_version = PICK(IOS_VERSIONS);
    } else if (u->platform == P_ANDROID) {
        u->device_model = PICK(ANDROID_MODELS);
        u->os_version = PICK(ANDROID_VERSIONS);
    } else {
        u->device_model = PICK(WEB_MODELS);
        u->os_version = PICK(WEB_VERSIONS);
    }
}

static void make_campaign(struct campaign *c)
{
    c->canvas = rnd_below(2);
    hex_uuid(c->id);
    hex_uuid(c->variation_id);
    hex_uuid(c->step_id);
    hex_uuid(c->app_group_id);
    snprintf(c->name, sizeof c->name, "%s", PICK(CAMPAIGN_NAMES));
    snprintf(c->variation_name, sizeof c->variation_name, "%s", PICK(VARIATION_NAMES));
    snprintf(c->step_name, sizeof c->step_name, "%s", PICK(STEP_NAMES));
}

#define NAPPS 3
static char APP_IDS[NAPPS][37]; /* ios, android, web apps */
#define NCAMPAIGNS 40
static struct campaign CAMPAIGNS[NCAMPAIGNS];

/* Placeholder id; the run nonce and tag are written into every template, the
 * last 12 hex digits per request. */
#define ID_LEN 36
#define ID_SEQ_OFF 24 /* offset of the 12-digit sequence inside the id */

static const char *platform_name(enum platform p)
{
    return p == P_IOS ? "ios" : p == P_ANDROID ? "android" : "web";
}

static void add_campaign(sb *b, const struct campaign *c)
{
    if (c->canvas)
        sb_printf(b,
                  ",\"canvas_id\":\"%s\",\"canvas_name\":\"%s\",\"canvas_variation_id\":\"%s\","
                  "\"canvas_variation_name\":\"%s\",\"canvas_step_id\":\"%s\","
                  "\"canvas_step_name\":\"%s\"",
                  c->id, c->name, c->variation_id, c->variation_name, c->step_id, c->step_name);
    else
        sb_printf(b,
                  ",\"campaign_id\":\"%s\",\"campaign_name\":\"%s\",\"message_variation_id\":"
                  "\"%s\",\"message_variation_name\":\"%s\"",
                  c->id, c->name, c->variation_id, c->variation_name);
}

static void add_device(sb *b, const struct user *u, int with_ad)
{
    sb_printf(b, ",\"platform\":\"%s\",\"device_model\":\"%s\",\"os_version\":\"%s\"",
              platform_name(u->platform), u->device_model, u->os_version);
    if (with_ad && u->platform != P_WEB)
        sb_printf(b, ",\"ad_id\":\"%s\",\"ad_id_type\":\"%s\",\"ad_tracking_enabled\":%s", u->ad_id,
                  u->platform == P_IOS ? "ios_idfa" : "google_ad_id",
                  rnd_below(4) ? "true" : "false");
}

/* Appends one event; *id_off receives the offset of its id's sequence digits. */
static void gen_event(sb *b, const struct user *u, const struct etype *t, long long now_s,
                      size_t *id_off)
{
    sb_printf(b, "{\"event_type\":\"%s\",\"id\":\"", t->name);
    *id_off = b->len + ID_SEQ_OFF;
    sb_printf(b, "00000000-0000-4000-8000-000000000000\",\"time\":%lld,", now_s - rnd_below(3600));
    sb_printf(b,
              "\"user\":{\"user_id\":\"%s\",\"external_user_id\":\"%s\",\"device_id\":\"%s\","
              "\"timezone\":\"%s\"},\"properties\":{",
              u->user_id, u->external_id, u->device_id, u->timezone);
    const struct campaign *c = &CAMPAIGNS[rnd_below(NCAMPAIGNS)];
    char send_id[37], dispatch_id[33];
    hex_uuid(send_id);
    hex_n(dispatch_id, 32);
    const char *app = APP_IDS[u->platform];
    sb_printf(b, "\"app_id\":\"%s\",\"app_group_id\":\"%s\"", app, c->app_group_id);
    const char *verb = strrchr(t->name, '.') + 1;
    switch (t->cat) {
    case C_EMAIL:
        add_campaign(b, c);
        sb_printf(b,
                  ",\"send_id\":\"%s\",\"dispatch_id\":\"%s\",\"email_address\":\"%s\","
                  "\"ip_pool\":\"transactional-pool-2\",\"esp\":\"sendgrid\",\"from_domain\":"
                  "\"mail.example-shop.com\"",
                  send_id, dispatch_id, u->email);
        if (!strcmp(verb, "Open"))
            sb_printf(b, ",\"user_agent\":\"%s\",\"machine_open\":\"%s\",\"is_amp\":false",
                      PICK(USER_AGENTS), rnd_below(3) ? "" : "true");
        else if (!strcmp(verb, "Click"))
            sb_printf(b,
                      ",\"user_agent\":\"%s\",\"url\":\"https://www.example-shop.com/collections/"
                      "winter?utm_source=braze&utm_medium=email&utm_campaign=%.8s\","
                      "\"link_id\":\"%.12s\",\"link_alias\":\"%s\",\"is_amp\":false",
                      PICK(USER_AGENTS), c->id, send_id, PICK(LINK_ALIASES));
        else if (strstr(verb, "Bounce"))
            sb_printf(b, ",\"bounce_reason\":\"%s\"", PICK(BOUNCE_REASONS));
        break;
    case C_PUSH:
        add_campaign(b, c);
        sb_printf(b, ",\"send_id\":\"%s\",\"dispatch_id\":\"%s\"", send_id, dispatch_id);
        add_device(b, u, 1);
        sb_printf(b, ",\"push_token\":\"%s\"", u->push_token);
        if (!strcmp(verb, "Open"))
            sb_printf(b, ",\"button_action_type\":\"URI\",\"button_string\":\"Shop now\"");
        break;
    case C_SMS: {
        add_campaign(b, c);
        char group[37];
        hex_uuid(group);
        sb_printf(b, ",\"send_id\":\"%s\",\"dispatch_id\":\"%s\",\"subscription_group_id\":\"%s\"",
                  send_id, dispatch_id, group);
        if (!strcmp(verb, "InboundReceive"))
            sb_printf(b,
                      ",\"user_phone_number\":\"%s\",\"inbound_phone_number\":\"+15005550006\","
                      "\"action\":\"subscribed\",\"message_body\":\"YES\"",
                      u->phone);
        else if (!strcmp(verb, "ShortLinkClick"))
            sb_printf(b,
                      ",\"user_phone_number\":\"%s\",\"short_url\":\"https://brz.ai/x7Kq2\","
                      "\"url\":\"https://www.example-shop.com/orders/48213?utm_source=braze\","
                      "\"user_agent\":\"%s\"",
                      u->phone, PICK(USER_AGENTS));
        else
            sb_printf(
                b,
                ",\"to_phone_number\":\"%s\",\"from_phone_number\":\"+15005550006\","
                "\"message_body\":\"%s\",\"message_extras\":\"{\\\"locale\\\":\\\"en-US\\\"}\"",
                u->phone, PICK(SMS_BODIES));
        if (!strcmp(verb, "DeliveryFailure") || !strcmp(verb, "Rejection"))
            sb_printf(b, ",\"error\":\"30003\",\"provider_error_code\":\"Unreachable destination "
                         "handset\"");
        break;
    }
    case C_CARD: {
        char card[37];
        hex_uuid(card);
        add_campaign(b, c);
        sb_printf(b, ",\"send_id\":\"%s\",\"dispatch_id\":\"%s\",\"content_card_id\":\"%s\"",
                  send_id, dispatch_id, card);
        add_device(b, u, 1);
        if (!strcmp(verb, "Click"))
            sb_printf(b, ",\"url\":\"https://www.example-shop.com/app/deals/today\"");
        break;
    }
    case C_INAPP:
    case C_NEWSFEED: {
        char card[37];
        hex_uuid(card);
        add_campaign(b, c);
        sb_printf(b, ",\"send_id\":\"%s\",\"card_id\":\"%s\"", send_id, card);
        add_device(b, u, 1);
        if (!strcmp(verb, "Click"))
            sb_printf(b, ",\"button_id\":\"1\"");
        break;
    }
    case C_CANVAS:
    case C_CAMPAIGN:
        add_campaign(b, c);
        sb_printf(b, ",\"send_id\":\"%s\",\"dispatch_id\":\"%s\",\"in_control_group\":%s", send_id,
                  dispatch_id, rnd_below(10) ? "false" : "true");
        if (strstr(verb, "Conversion"))
            sb_printf(b, ",\"conversion_behavior_index\":0,\"conversion_behavior\":"
                         "\"{\\\"type\\\":\\\"purchase\\\",\\\"product\\\":\\\"any\\\"}\"");
        if (rnd_below(2))
            add_device(b, u, 0);
        break;
    case C_WEBHOOK:
        add_campaign(b, c);
        sb_printf(b, ",\"send_id\":\"%s\",\"dispatch_id\":\"%s\"", send_id, dispatch_id);
        break;
    case C_WHATSAPP:
        add_campaign(b, c);
        sb_printf(b,
                  ",\"send_id\":\"%s\",\"dispatch_id\":\"%s\",\"to_phone_number\":\"%s\","
                  "\"from_phone_number\":\"+15005550006\",\"template_name\":"
                  "\"order_update_v3\",\"language\":\"en_US\"",
                  send_id, dispatch_id, u->phone);
        break;
    case C_SUBSCRIPTION: {
        char group[37];
        hex_uuid(group);
        sb_printf(b,
                  ",\"email_address\":\"%s\",\"subscription_group_id\":\"%s\","
                  "\"subscription_status\":\"%s\",\"channel\":\"email\",\"state_change_source\":"
                  "\"Preference Center\"",
                  u->email, group, rnd_below(2) ? "Subscribed" : "Unsubscribed");
        add_campaign(b, c);
        break;
    }
    case C_UNINSTALL:
        break;
    }
    sb_printf(b, "}}");
}

struct tmpl {
    char *body;
    size_t len;
    size_t *id_off; /* events offsets of the sequence digits */
    size_t nevents;
};

static void make_templates(struct tmpl *t, size_t n, size_t events, unsigned nusers, unsigned tag,
                           uint32_t nonce, double *avg_event_bytes)
{
    struct user *users = xmalloc(nusers * sizeof(*users));
    for (unsigned i = 0; i < nusers; i++)
        make_user(&users[i], i);
    for (int i = 0; i < NAPPS; i++)
        hex_uuid(APP_IDS[i]);
    for (int i = 0; i < NCAMPAIGNS; i++)
        make_campaign(&CAMPAIGNS[i]);
    long long now_s = (long long)(wall_ms() / 1000);
    size_t total = 0, evbytes = 0;
    char prefix[15];
    snprintf(prefix, sizeof prefix, "%08x-%04x", nonce, tag & 0xffff);
    for (size_t k = 0; k < n; k++) {
        sb b = {0};
        t[k].id_off = xmalloc(events * sizeof(size_t));
        t[k].nevents = events;
        sb_printf(&b, "{\"events\":[");
        size_t e = 0;
        while (e < events) {
            /* a user with 1-3 events (Braze sends a user's recent events together) */
            const struct user *u = &users[rnd_below(nusers)];
            unsigned r = rnd_below(10), m = r < 4 ? 1 : r < 7 ? 2 : r < 9 ? 3 : 4;
            for (unsigned j = 0; j < m && e < events; j++, e++) {
                if (e)
                    sb_printf(&b, ",");
                size_t before = b.len;
                gen_event(&b, u, pick_type(), now_s, &t[k].id_off[e]);
                evbytes += b.len - before;
                memcpy(b.p + t[k].id_off[e] - ID_SEQ_OFF, prefix, 13);
            }
        }
        sb_printf(&b, "]}");
        t[k].body = b.p;
        t[k].len = b.len;
        total += events;
    }
    *avg_event_bytes = total ? (double)evbytes / (double)total : 0;
    free(users);
}

/* Writes the sequence number as 12 lowercase hex digits, scrambled by a bijection
 * of 48-bit numbers: ids stay unique but arrive in random order, like Braze's
 * UUIDs, so that the service's id index sees random inserts, not appends. */
static int sequential_ids; /* --ids sequential: no scrambling */

static void put_seq(char *p, uint64_t seq)
{
    static const char H[] = "0123456789abcdef";
    const uint64_t M = (1ull << 48) - 1;
    uint64_t x = seq & M;
    if (!sequential_ids) {
        x = (x * 0x9E3779B97F4Bull) & M; /* odd multipliers: invertible mod 2^48 */
        x ^= x >> 24;
        x = (x * 0xC2B2AE3D27D5ull) & M;
        x ^= x >> 21;
    }
    for (int i = 11; i >= 0; i--) {
        p[i] = H[x & 15];
        x >>= 4;
    }
}

/* ---- HTTP ------------------------------------------------------------------ */

struct slot {
    CURL *easy;
    char *buf;
    size_t cap;
    size_t nevents;
    double sched, sent;
    int busy;
    char resp[512];
    size_t resp_len;
};

struct run {
    const char *url, *token;
    struct tmpl *tmpl;
    size_t ntmpl, next_tmpl;
    uint64_t seq;
    struct curl_slist *headers;
    CURLM *multi;
    struct slot **slots;
    size_t nslots, busy, max_busy;
    /* results */
    uint64_t requests, ok_requests, ok_events, forwarded, duplicates, errors, transport_errors,
        unanswered, connects;
    uint64_t status_counts[600];
    double *lat;
    size_t nlat, caplat;
    FILE *latlog; /* --latency-log: scheduled offset (s), latency (ms), status */
    double begin;
    double first_sent, last_done;
    int64_t start_wall_ms;
    int verbose_errors;
};

static size_t on_write(char *p, size_t size, size_t n, void *ud)
{
    struct slot *s = ud;
    size_t len = size * n;
    size_t room = sizeof s->resp - 1 - s->resp_len;
    size_t m = len < room ? len : room;
    memcpy(s->resp + s->resp_len, p, m);
    s->resp_len += m;
    s->resp[s->resp_len] = '\0';
    return len;
}

static struct slot *slot_new(struct run *R)
{
    struct slot *s = calloc(1, sizeof(*s));
    if (!s)
        die("out of memory");
    size_t cap = 0;
    for (size_t i = 0; i < R->ntmpl; i++)
        if (R->tmpl[i].len > cap)
            cap = R->tmpl[i].len;
    s->buf = xmalloc(cap);
    s->cap = cap;
    s->easy = curl_easy_init();
    if (!s->easy)
        die("curl_easy_init failed");
    CURL *e = s->easy;
    curl_easy_setopt(e, CURLOPT_URL, R->url);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, R->headers);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(e, CURLOPT_PRIVATE, s);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 120000L);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "tributary-bench-loadgen");
    R->slots = xrealloc(R->slots, (R->nslots + 1) * sizeof(*R->slots));
    R->slots[R->nslots++] = s;
    return s;
}

static struct slot *slot_free_one(struct run *R)
{
    for (size_t i = 0; i < R->nslots; i++)
        if (!R->slots[i]->busy)
            return R->slots[i];
    return slot_new(R);
}

static void start(struct run *R, struct slot *s, double sched)
{
    const struct tmpl *t = &R->tmpl[R->next_tmpl];
    R->next_tmpl = (R->next_tmpl + 1) % R->ntmpl;
    memcpy(s->buf, t->body, t->len);
    for (size_t i = 0; i < t->nevents; i++)
        put_seq(s->buf + t->id_off[i], R->seq++);
    s->nevents = t->nevents;
    s->resp_len = 0;
    s->resp[0] = '\0';
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDS, s->buf);
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)t->len);
    s->sched = sched;
    s->sent = mono_s();
    if (R->requests == 0) {
        R->first_sent = s->sent;
        R->start_wall_ms = wall_ms();
    }
    s->busy = 1;
    R->busy++;
    if (R->busy > R->max_busy)
        R->max_busy = R->busy;
    R->requests++;
    CURLMcode mc = curl_multi_add_handle(R->multi, s->easy);
    if (mc != CURLM_OK)
        die("curl_multi_add_handle: %s", curl_multi_strerror(mc));
}

static void record_latency(struct run *R, double v)
{
    if (R->nlat == R->caplat) {
        R->caplat = R->caplat ? R->caplat * 2 : 4096;
        R->lat = xrealloc(R->lat, R->caplat * sizeof(double));
    }
    R->lat[R->nlat++] = v;
}

static uint64_t json_field(const char *body, const char *name)
{
    char key[64];
    snprintf(key, sizeof key, "\"%s\":", name);
    const char *p = strstr(body, key);
    return p ? strtoull(p + strlen(key), NULL, 10) : 0;
}

/* Handles finished transfers; returns how many finished. */
static size_t reap(struct run *R)
{
    size_t done = 0;
    CURLMsg *m;
    int left;
    double now = mono_s();
    while ((m = curl_multi_info_read(R->multi, &left))) {
        if (m->msg != CURLMSG_DONE)
            continue;
        struct slot *s;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&s);
        CURLcode rc = m->data.result;
        long status = 0;
        curl_easy_getinfo(m->easy_handle, CURLINFO_RESPONSE_CODE, &status);
        long connects = 0;
        if (curl_easy_getinfo(m->easy_handle, CURLINFO_NUM_CONNECTS, &connects) == CURLE_OK &&
            connects > 0)
            R->connects += (uint64_t)connects;
        curl_multi_remove_handle(R->multi, m->easy_handle);
        s->busy = 0;
        R->busy--;
        done++;
        R->last_done = now;
        if (rc != CURLE_OK) {
            R->errors++;
            R->transport_errors++;
            if (R->verbose_errors++ < 10)
                fprintf(stderr, "loadgen: request failed: %s\n", curl_easy_strerror(rc));
            continue;
        }
        if (R->latlog)
            fprintf(R->latlog, "%.4f %.2f %ld\n", s->sched - R->begin, (now - s->sched) * 1000,
                    status);
        if (status >= 0 && status < 600)
            R->status_counts[status]++;
        if (status != 200) {
            R->errors++;
            if (R->verbose_errors++ < 10)
                fprintf(stderr, "loadgen: HTTP %ld: %.200s\n", status, s->resp);
            continue;
        }
        R->ok_requests++;
        R->ok_events += s->nevents;
        R->forwarded += json_field(s->resp, "forwarded");
        R->duplicates += json_field(s->resp, "duplicates");
        record_latency(R, now - s->sched);
    }
    return done;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *v, size_t n, double q)
{
    if (!n)
        return 0;
    size_t k = (size_t)ceil(q * (double)n);
    if (k < 1)
        k = 1;
    if (k > n)
        k = n;
    return v[k - 1];
}

static void report(struct run *R, const char *mode, double seconds, double rate)
{
    double dur = R->last_done > R->first_sent ? R->last_done - R->first_sent : 0;
    printf("mode %s\n", mode);
    printf("requests %llu\n", (unsigned long long)R->requests);
    printf("ok_requests %llu\n", (unsigned long long)R->ok_requests);
    printf("ok_events %llu\n", (unsigned long long)R->ok_events);
    printf("forwarded_events %llu\n", (unsigned long long)R->forwarded);
    printf("duplicates %llu\n", (unsigned long long)R->duplicates);
    printf("errors %llu\n", (unsigned long long)R->errors);
    printf("transport_errors %llu\n", (unsigned long long)R->transport_errors);
    printf("unanswered %llu\n", (unsigned long long)R->unanswered);
    for (int i = 0; i < 600; i++)
        if (R->status_counts[i] && i != 200)
            printf("status_%d %llu\n", i, (unsigned long long)R->status_counts[i]);
    printf("connections %llu\n", (unsigned long long)R->connects); /* TCP connections opened */
    printf("max_in_flight %zu\n", R->max_busy);
    printf("start_ms %lld\n", (long long)R->start_wall_ms);
    printf("end_ms %lld\n", (long long)(R->start_wall_ms + (int64_t)(dur * 1000.0)));
    printf("duration_s %.3f\n", dur);
    printf("events_per_s %.0f\n", dur > 0 ? (double)R->ok_events / dur : 0.0);
    if (rate > 0) {
        printf("offered_requests_per_s %.1f\n", rate);
        printf("scheduled_seconds %.3f\n", seconds);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("cpu_s %.3f\n", (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                               (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
    printf("cpu_user_s %.3f\n", (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6);
    qsort(R->lat, R->nlat, sizeof(double), cmp_double);
    printf("latency_p50_ms %.2f\n", pct(R->lat, R->nlat, 0.50) * 1000);
    printf("latency_p90_ms %.2f\n", pct(R->lat, R->nlat, 0.90) * 1000);
    printf("latency_p99_ms %.2f\n", pct(R->lat, R->nlat, 0.99) * 1000);
    printf("latency_p999_ms %.2f\n", pct(R->lat, R->nlat, 0.999) * 1000);
    printf("latency_max_ms %.2f\n", R->nlat ? R->lat[R->nlat - 1] * 1000 : 0.0);
    fflush(stdout);
}

/* ---- main ------------------------------------------------------------------ */

struct opts {
    const char *url, *token, *latency_log;
    int conns;
    double seconds, rate, timeout;
    size_t events, templates, requests;
    unsigned users, tag;
    uint64_t seed;
};

static void usage(void)
{
    fputs("usage: loadgen closed|rate|dump [--url URL] [--token T] [--conns N] [--seconds S]\n"
          "               [--rate REQ_PER_S] [--events N] [--users N] [--templates N]\n"
          "               [--requests N] [--seed N] [--tag N] [--timeout S]\n"
          "               [--latency-log FILE] [--ids random|sequential]\n"
          "       loadgen get URL\n"
          "       loadgen freeport\n",
          stderr);
    exit(2);
}

static void parse(int argc, char **argv, struct opts *o)
{
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--url"))
            o->url = v;
        else if (!strcmp(a, "--token"))
            o->token = v;
        else if (!strcmp(a, "--conns"))
            o->conns = atoi(v);
        else if (!strcmp(a, "--seconds"))
            o->seconds = atof(v);
        else if (!strcmp(a, "--rate"))
            o->rate = atof(v);
        else if (!strcmp(a, "--timeout"))
            o->timeout = atof(v);
        else if (!strcmp(a, "--events"))
            o->events = (size_t)atol(v);
        else if (!strcmp(a, "--templates"))
            o->templates = (size_t)atol(v);
        else if (!strcmp(a, "--requests"))
            o->requests = (size_t)atol(v);
        else if (!strcmp(a, "--users"))
            o->users = (unsigned)atol(v);
        else if (!strcmp(a, "--seed"))
            o->seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--ids")) {
            if (strcmp(v, "random") && strcmp(v, "sequential"))
                usage();
            sequential_ids = !strcmp(v, "sequential");
        } else if (!strcmp(a, "--latency-log"))
            o->latency_log = v;
        else if (!strcmp(a, "--tag"))
            o->tag = (unsigned)atol(v);
        else
            usage();
    }
    if (o->conns < 1 || o->seconds <= 0 || o->events < 1 || o->templates < 1 || o->users < 1)
        die("bad option value");
}

static int cmd_get(const char *url)
{
    CURL *e = curl_easy_init();
    if (!e)
        return 2;
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 5000L);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    CURLcode rc = curl_easy_perform(e);
    long status = 0;
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(e);
    fflush(stdout);
    return rc == CURLE_OK && status == 200 ? 0 : 1;
}

static int cmd_freeport(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0)
        die("bind: %s", strerror(errno));
    printf("%u\n", (unsigned)ntohs(a.sin_port));
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    const char *mode = argv[1];
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
        die("curl_global_init failed");
    if (!strcmp(mode, "get")) {
        if (argc != 3)
            usage();
        return cmd_get(argv[2]);
    }
    if (!strcmp(mode, "freeport"))
        return cmd_freeport();
    if (strcmp(mode, "closed") && strcmp(mode, "rate") && strcmp(mode, "dump"))
        usage();

    struct opts o = {.conns = 16,
                     .seconds = 20,
                     .rate = 200,
                     .timeout = 30,
                     .events = 100,
                     .templates = 200,
                     .requests = 10,
                     .users = 8000,
                     .tag = 1,
                     .seed = 1};
    if (!strcmp(mode, "rate"))
        o.seconds = 15;
    parse(argc, argv, &o);
    rng_state ^= o.seed * 0x9E3779B97F4A7C15ull;
    if (!rng_state)
        rng_state = 1;
    /* the run nonce keeps ids unique across runs; the seed keeps content reproducible */
    uint32_t nonce = (uint32_t)((uint64_t)wall_ms() * 2654435761u ^ (uint64_t)getpid() << 16);

    size_t ntmpl = !strcmp(mode, "dump") ? o.requests : o.templates;
    struct tmpl *tmpl = calloc(ntmpl, sizeof(*tmpl));
    if (!tmpl)
        die("out of memory");
    double t0 = mono_s(), avg_event = 0;
    make_templates(tmpl, ntmpl, o.events, o.users, o.tag, nonce, &avg_event);
    if (!strcmp(mode, "dump")) {
        uint64_t seq = 0;
        for (size_t k = 0; k < ntmpl; k++) {
            for (size_t i = 0; i < tmpl[k].nevents; i++)
                put_seq(tmpl[k].body + tmpl[k].id_off[i], seq++);
            fwrite(tmpl[k].body, 1, tmpl[k].len, stdout);
            fputc('\n', stdout);
        }
        fprintf(stderr, "loadgen: %zu bodies, %.0f bytes per event on average\n", ntmpl, avg_event);
        return 0;
    }
    fprintf(stderr, "loadgen: %zu bodies of %zu events generated in %.2f s, %.0f bytes per event\n",
            ntmpl, o.events, mono_s() - t0, avg_event);
    if (!o.url || !o.token)
        die("--url and --token are required");

    /* open loop against a saturated service: thousands of connections */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }

    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct run R = {0};
    R.url = o.url;
    R.token = o.token;
    R.tmpl = tmpl;
    R.ntmpl = ntmpl;
    char auth[512];
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", o.token);
    R.headers = curl_slist_append(R.headers, "Content-Type: application/json");
    R.headers = curl_slist_append(R.headers, "Braze-Currents-Version: 1");
    R.headers = curl_slist_append(R.headers, auth);
    R.headers = curl_slist_append(R.headers, "Expect:");
    R.multi = curl_multi_init();
    if (!R.headers || !R.multi)
        die("curl init failed");
    curl_multi_setopt(R.multi, CURLMOPT_MAXCONNECTS, 4096L);

    int closed = !strcmp(mode, "closed");
    if (o.latency_log && !(R.latlog = fopen(o.latency_log, "w")))
        die("cannot write %s: %s", o.latency_log, strerror(errno));
    double begin = mono_s(), end = begin + o.seconds;
    R.begin = begin;
    uint64_t total = closed ? 0 : (uint64_t)ceil(o.rate * o.seconds);
    uint64_t next = 0; /* rate mode: index of the next scheduled request */
    double interval = closed ? 0 : 1.0 / o.rate;
    double last_progress = begin;

    if (closed) {
        curl_multi_setopt(R.multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)o.conns);
        for (int i = 0; i < o.conns; i++)
            start(&R, slot_new(&R), mono_s());
    }
    double give_up = 0;
    for (;;) {
        double now = mono_s();
        int sending = !stop_flag && (closed ? now < end : next < total);
        if (!closed) {
            while (sending && next < total && begin + (double)next * interval <= now) {
                start(&R, slot_free_one(&R), begin + (double)next * interval);
                next++;
            }
        }
        int running = 0;
        CURLMcode mc = curl_multi_perform(R.multi, &running);
        if (mc != CURLM_OK)
            die("curl_multi_perform: %s", curl_multi_strerror(mc));
        reap(&R);
        now = mono_s();
        sending = !stop_flag && (closed ? now < end : next < total);
        if (closed && sending) {
            for (size_t i = 0; i < R.nslots; i++)
                if (!R.slots[i]->busy)
                    start(&R, R.slots[i], now);
            curl_multi_perform(R.multi, &running);
        }
        if (!sending && R.busy == 0)
            break;
        if (!sending) {
            if (give_up == 0)
                give_up = now + o.timeout;
            if (now > give_up || stop_flag) {
                fprintf(stderr,
                        "loadgen: %zu requests still unanswered after %.0f s; counted as "
                        "errors\n",
                        R.busy, o.timeout);
                R.errors += R.busy;
                R.unanswered = R.busy;
                break;
            }
        }
        if (now - last_progress >= 5) {
            last_progress = now;
            fprintf(stderr,
                    "loadgen: %s %.0f s: %llu requests, %llu ok, %llu errors, %zu in "
                    "flight, %llu connections opened\n",
                    mode, now - begin, (unsigned long long)R.requests,
                    (unsigned long long)R.ok_requests, (unsigned long long)R.errors, R.busy,
                    (unsigned long long)R.connects);
        }
        int wait_ms = 50;
        if (!closed && sending && next < total) {
            double dt = begin + (double)next * interval - mono_s();
            wait_ms = dt <= 0 ? 0 : (int)ceil(dt * 1000);
            if (wait_ms > 50)
                wait_ms = 50;
        }
        if (wait_ms > 0)
            curl_multi_poll(R.multi, NULL, 0, wait_ms, NULL);
    }
    report(&R, mode, o.seconds, closed ? 0 : o.rate);
    for (size_t i = 0; i < R.nslots; i++) {
        if (R.slots[i]->busy)
            curl_multi_remove_handle(R.multi, R.slots[i]->easy);
        curl_easy_cleanup(R.slots[i]->easy);
        free(R.slots[i]->buf);
        free(R.slots[i]);
    }
    free(R.slots);
    curl_multi_cleanup(R.multi);
    curl_slist_free_all(R.headers);
    for (size_t k = 0; k < ntmpl; k++) {
        free(tmpl[k].body);
        free(tmpl[k].id_off);
    }
    free(tmpl);
    free(R.lat);
    if (R.latlog)
        fclose(R.latlog);
    curl_global_cleanup();
    return 0;
}
