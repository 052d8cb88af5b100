-- The default mapping: Braze Currents event -> mParticle batch.
--
-- Reproduces Braze's own mParticle export: 54 event types, routed to the iOS,
-- Android, Web or Unbound feed, with the user's external_user_id as customer id.
-- Edit this file, or add files after it (they run in name order) to change the
-- result; see the README section "Writing rules".
--
-- process(event, out) returns the output table, or false and a reason:
--   "unsupported_type"  not one of the mapped event types (counted as filtered)
--   "not_selected"      excluded by the `events` setting (filtered)
--   "no_external_id"    the user has no external_user_id (skipped)

local null = cjson.null
-- Locals: a global lookup goes through the sandbox's environment on every use.
local type, pairs, tostring = type, pairs, tostring
local encode = cjson.encode
local find = string.find
local gsub = string.gsub
local tointeger, floor, abs = math.tointeger, math.floor, math.abs
-- Every property not used elsewhere becomes a custom attribute, within
-- mParticle's limits (see README, "What rules can use").
local custom_attributes = tributary.custom_attributes

-- Braze event_type -> mParticle event_name (false: an `uninstall` event, no name).
local NAMES = {
  ["users.behaviors.Uninstall"] = false,
  ["users.behaviors.app.NewsFeedImpression"] = "News Feed Views",
  ["users.behaviors.subscription.GlobalStateChange"] = "Global Subscription State Changes",
  ["users.behaviors.subscriptiongroup.StateChange"] = "Subscription Group State Changes",
  ["users.campaigns.Abort"] = "Campaign Aborts",
  ["users.campaigns.Conversion"] = "Campaign Conversions",
  ["users.campaigns.EnrollInControl"] = "Campaign Control Group Enrollments",
  ["users.canvas.Abort"] = "Canvas Aborts",
  ["users.canvas.Conversion"] = "Canvas Conversions",
  ["users.canvas.Entry"] = "Canvas Entries",
  ["users.canvas.exit.MatchedAudience"] = "Exit Matched Audiences",
  ["users.canvas.exit.PerformedEvent"] = "Exit Performed Events",
  ["users.canvas.experimentstep.Conversion"] = "Experiment Step Conversions",
  ["users.canvas.experimentstep.SplitEntry"] = "Experiment Split Entries",
  ["users.messages.contentcard.Abort"] = "Content Card Aborts",
  ["users.messages.contentcard.Click"] = "Content Card Clicks",
  ["users.messages.contentcard.Dismiss"] = "Content Card Dismisses",
  ["users.messages.contentcard.Impression"] = "Content Card Impressions",
  ["users.messages.contentcard.Send"] = "Content Card Sends",
  ["users.messages.email.Abort"] = "Email Aborts",
  ["users.messages.email.Bounce"] = "Email Bounces",
  ["users.messages.email.Click"] = "Email Clicks",
  ["users.messages.email.Delivery"] = "Email Deliveries",
  ["users.messages.email.MarkAsSpam"] = "Email Marks As Spam",
  ["users.messages.email.Open"] = "Email Opens",
  ["users.messages.email.Send"] = "Email Sends",
  ["users.messages.email.SoftBounce"] = "Email Soft Bounces",
  ["users.messages.email.Unsubscribe"] = "Email Unsubscribes",
  ["users.messages.inappmessage.Abort"] = "In-App Message Aborts",
  ["users.messages.inappmessage.Click"] = "In-App Message Clicks",
  ["users.messages.inappmessage.Impression"] = "In-App Message Impressions",
  ["users.messages.newsfeedcard.Abort"] = "News Feed Card Aborts",
  ["users.messages.newsfeedcard.Click"] = "News Feed Card Clicks",
  ["users.messages.newsfeedcard.Impression"] = "News Feed Card Views",
  ["users.messages.pushnotification.Abort"] = "Push Notification Aborts",
  ["users.messages.pushnotification.Bounce"] = "Push Notification Bounces",
  ["users.messages.pushnotification.Open"] = "Push Notification Opens",
  ["users.messages.pushnotification.Send"] = "Push Notification Sends",
  ["users.messages.sms.Abort"] = "SMS Aborts",
  ["users.messages.sms.CarrierSend"] = "SMS Carrier Sends",
  ["users.messages.sms.Delivery"] = "SMS Deliveries",
  ["users.messages.sms.DeliveryFailure"] = "SMS Delivery Failures",
  ["users.messages.sms.InboundReceive"] = "SMS Inbound Received",
  ["users.messages.sms.Rejection"] = "SMS Rejections",
  ["users.messages.sms.Send"] = "SMS Sends",
  ["users.messages.sms.ShortLinkClick"] = "SMS Short Link Clicks",
  ["users.messages.webhook.Abort"] = "Webhook Aborts",
  ["users.messages.webhook.Send"] = "Webhook Sends",
  ["users.messages.whatsapp.Abort"] = "WhatsApp Aborts",
  ["users.messages.whatsapp.Delivery"] = "WhatsApp Deliveries",
  ["users.messages.whatsapp.Failure"] = "WhatsApp Failures",
  ["users.messages.whatsapp.InboundReceive"] = "WhatsApp Inbound Received",
  ["users.messages.whatsapp.Read"] = "WhatsApp Reads",
  ["users.messages.whatsapp.Send"] = "WhatsApp Sends",
}

-- Braze's mParticle page spells two of them differently; both select the event.
local ALIASES = {
  ["users.campaigns.Abort"] = "users_campaigns_abort",
  ["users.canvas.Abort"] = "users_canvas_abort",
}

-- A name in the `events` setting that selects nothing is a typo, and every
-- event of the type meant would be filtered: refuse it, as the configuration
-- refuses an unknown key (`tributary check` and a reload say so).
do
  local alias_of = {}
  for event_type, alias in pairs(ALIASES) do alias_of[alias] = event_type end
  for name in pairs(tributary.events or {}) do
    if NAMES[name] == nil and alias_of[name] == nil then
      error(("events: %q is not one of the mapped event types (see NAMES in this file)")
            :format(name))
    end
  end
end

-- properties.platform -> feed
local PLATFORM_FEED = {
  ios = "ios", tvos = "ios",
  android = "android", kindle = "android",
  web = "web",
}

-- feed -> device_info.platform
local DEVICE_PLATFORM = { ios = "iOS", android = "Android", web = "web" }

-- properties.ad_id_type -> device_info field
local AD_ID_FIELD = {
  ios_idfa = "ios_advertising_id",
  google_ad_id = "android_advertising_id",
  windows_ad_id = "microsoft_advertising_id",
  roku_ad_id = "roku_advertising_id",
}

-- Properties that land elsewhere (or nowhere) instead of in custom_attributes:
-- os_version and media_urls always; device_model when it went to device_info,
-- ad_id and ad_id_type when ad_id_type named one of the AD_ID_FIELD types and
-- ad_id went there, ad_tracking_enabled when it was a boolean. A property
-- that did not go to device_info (a table, a type of ad id mParticle has no
-- field for) stays a custom attribute. CONSUMED[MODEL + AD + TRACKING], for
-- those used.
local MODEL, AD, TRACKING = 1, 2, 4
local CONSUMED = {}
for used = 0, MODEL + AD + TRACKING do
  local t = { os_version = true, media_urls = true }
  if used & MODEL ~= 0 then t.device_model = true end
  if used & AD ~= 0 then t.ad_id, t.ad_id_type = true, true end
  if used & TRACKING ~= 0 then t.ad_tracking_enabled = true end
  CONSUMED[used] = t
end

-- Absent and JSON null are the same.
local function present(v)
  if v == nil or v == null then return nil end
  return v
end

-- What `user` or `properties` is read as when it is not a JSON object (a
-- list, a string, null): an empty one. Never written to.
local NO_FIELDS = setmetatable({}, { __newindex = function() error("read only") end })

-- A scalar as text. cjson decodes every JSON number as a float, which
-- tostring writes as 12345.0: numbers are written as JSON writes them (whole
-- ones as integers, others in full). Absent values, tables and numbers JSON
-- cannot write (1e400 decodes to infinity) have no text.
local function text(v)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return v - v == 0 and encode(v) or nil end
  if v == nil or t == "table" then return nil end
  return tostring(v)
end

-- The characters of a string as mParticle's limits are read (and the host
-- cuts to): UTF-16 units, a character beyond U+FFFF (most emoji) counting two;
-- text that is not UTF-8 counts each of its bytes (more than the host, which
-- writes U+FFFD for each byte that begins no character: never fewer).
local function chars(s)
  local _, astral = gsub(s, "[\240-\244][\128-\191][\128-\191][\128-\191]", "")
  return (utf8.len(s) or #s) + astral
end

-- An identity or device identifier: a non-empty string, or a number as text;
-- absent, null, "" or blanks only, booleans and tables have none (true, or
-- " ", would make every such user one mParticle customer).
local function identifier(v)
  local t = type(v)
  if t == "string" then
    -- one that begins with a visible character needs no search (a string
    -- comparison is a Lua instruction, a search a library call)
    if v >= "!" or find(v, "%S") then return v end
    return nil
  end
  if t ~= "number" then return nil end
  return text(v)
end

local function feed_for(props)
  local platform, feed = props.platform
  if type(platform) == "string" and platform ~= "" then
    -- a platform without a feed of its own (roku) is unbound, whatever its app
    feed = PLATFORM_FEED[platform] or "unbound"
  else
    local app_id = present(props.app_id)
    feed = app_id and tributary.apps[app_id] or "unbound"
  end
  -- mParticle treats a platform's data without its own credentials as unbound
  if feed ~= "unbound" and not tributary.feeds[feed] and tributary.feeds.unbound then
    feed = "unbound"
  end
  return feed
end

local function selected(event_type)
  local events = tributary.events
  if events == nil then return true end
  return events[event_type] or (ALIASES[event_type] ~= nil and events[ALIASES[event_type]]) or false
end

-- Event types whose properties.email_address is the user's email identity.
local EMAIL_IDENTITY = {}
for event_type in pairs(NAMES) do
  if event_type:find("users.messages.email.", 1, true) == 1
      or event_type:find("users.behaviors.subscription", 1, true) == 1 then
    EMAIL_IDENTITY[event_type] = true
  end
end

-- Event types with the user's phone number, and the property that holds it:
-- to_phone_number of SMS and WhatsApp messages sent, user_phone_number of those
-- received and of short-link clicks (there to_phone_number, if any, is not the
-- user's). Other events keep such properties as attributes.
local PHONE_IDENTITY = {}
for event_type in pairs(NAMES) do
  if event_type:find("users.messages.sms.", 1, true) == 1
      or event_type:find("users.messages.whatsapp.", 1, true) == 1 then
    local from_user = event_type:find("InboundReceive", 1, true)
      or event_type:find("ShortLinkClick", 1, true)
    PHONE_IDENTITY[event_type] = from_user and "user_phone_number" or "to_phone_number"
  end
end

local function process(event, out)
  local event_type = event.event_type
  local name = NAMES[event_type]
  if name == nil then return false, "unsupported_type" end
  if not selected(event_type) then return false, "not_selected" end

  local user, props = event.user, event.properties
  if type(user) ~= "table" or #user > 0 then user = NO_FIELDS end
  if type(props) ~= "table" or #props > 0 then props = NO_FIELDS end
  local external = user.external_user_id
  if type(external) == "number"
      and not (floor(external) == external and abs(external) < 2 ^ 53) then
    -- a JSON number is read as a float: with a fraction or past 2^53 its text
    -- is not the id sent, and may be another user's (a dead letter keeps it)
    error("external_user_id is a number that has no exact text (a fraction, or beyond 2^53); "
          .. "ids are strings in Currents")
  end
  local customer_id = identifier(external)
  if customer_id == nil then return false, "no_external_id" end

  local feed = feed_for(props)

  -- identities and device identifiers are text (a table there has none)
  local email = EMAIL_IDENTITY[event_type] and identifier(props.email_address) or nil
  local mobile_key = PHONE_IDENTITY[event_type]
  local mobile = mobile_key and identifier(props[mobile_key]) or nil
  -- a user attribute's value has at most 4,096 characters: a longer "number"
  -- is none, and is left out (counted) rather than the event refused
  local mobile_attribute = mobile
  if mobile and chars(mobile) > 4096 then
    mobile_attribute = nil
    tributary.count("attribute_dropped")
  end

  local device_id = identifier(user.device_id)
  local model = identifier(props.device_model)
  local ad_field = AD_ID_FIELD[present(props.ad_id_type)]
  local ad_id = ad_field and identifier(props.ad_id)
  local tracking = present(props.ad_tracking_enabled)
  local device_info = { platform = DEVICE_PLATFORM[feed], device_model = model }
  if feed == "ios" then device_info.ios_idfv = device_id end
  if feed == "android" then device_info.android_uuid = device_id end
  local went = model and MODEL or 0
  if ad_id then
    device_info[ad_field] = ad_id
    went = went + AD
  end
  if type(tracking) == "boolean" then
    device_info.limit_ad_tracking = not tracking
    went = went + TRACKING
  end
  local used = CONSUMED[went]

  -- every other property is a custom attribute, and the user's device_id
  local extra = device_id and { device_id = device_id } or nil
  local card = present(props.content_card_id)
  if card ~= nil then -- Braze's content_card_id is mParticle's card_id ...
    if present(props.card_id) == nil then
      extra = extra or {}
      extra.card_id = card
    else -- ... unless the event has a card_id of its own
      tributary.count("attribute_dropped")
    end
  end

  local data = {
    -- the request's time is checked: from 0 to 2^53 ms, which are exact
    timestamp_unixtime_ms = tointeger(floor(event.time * 1000 + 0.5)),
    source_message_id = event.id,
    custom_attributes = custom_attributes(props, extra, used, "content_card_id",
                                          email and "email_address", mobile and mobile_key),
    event_name = name or nil,
    custom_event_type = name and "other" or nil,
  }

  return {
    feed = feed,
    batch = {
      environment = tributary.environment,
      user_identities = { customer_id = customer_id, email = email },
      user_attributes = { ["$mobile"] = mobile_attribute },
      device_info = device_info,
    },
    event = { event_type = name and "custom_event" or "uninstall", data = data },
  }
end

-- Examples, run by `tributary check` and before every reload.
local absent = tributary.absent
local tests = {
  {
    name = "push send on iOS",
    event = {
      event_type = "users.messages.pushnotification.Send",
      id = "a1b2c3d4-0000-4000-8000-000000000001",
      time = 1732800000,
      user = { user_id = "5f8a9b0c1d2e3f4a5b6c7d8e", external_user_id = "customer-1234",
               device_id = "2E3C1F4A-77B2-4C8E-9A01-6F2D3B4C5D6E", timezone = "Europe/Berlin" },
      properties = { app_id = "app-1", campaign_name = "Winter sale", platform = "ios",
                     device_model = "iPhone15,2", os_version = "iOS 17.6.1",
                     ad_id = "idfa-1", ad_id_type = "ios_idfa", ad_tracking_enabled = true },
    },
    expect = {
      feed = "ios",
      batch = {
        user_identities = { customer_id = "customer-1234", email = absent },
        device_info = { platform = "iOS", device_model = "iPhone15,2",
                        ios_idfv = "2E3C1F4A-77B2-4C8E-9A01-6F2D3B4C5D6E",
                        ios_advertising_id = "idfa-1", limit_ad_tracking = false },
      },
      event = {
        event_type = "custom_event",
        data = {
          event_name = "Push Notification Sends", custom_event_type = "other",
          timestamp_unixtime_ms = 1732800000000,
          source_message_id = "a1b2c3d4-0000-4000-8000-000000000001",
          custom_attributes = { app_id = "app-1", campaign_name = "Winter sale",
                                device_id = "2E3C1F4A-77B2-4C8E-9A01-6F2D3B4C5D6E",
                                platform = "ios", os_version = absent, device_model = absent,
                                user_id = absent, timezone = absent },
        },
      },
    },
  },
  {
    name = "email open goes to unbound with the email identity",
    event = {
      event_type = "users.messages.email.Open", id = "e-1", time = 1732800001,
      user = { external_user_id = "customer-1" },
      properties = { email_address = "jane@example.com", campaign_id = "c-1" },
    },
    expect = {
      feed = "unbound",
      batch = { user_identities = { customer_id = "customer-1", email = "jane@example.com" },
                device_info = { platform = absent } },
      event = { data = { event_name = "Email Opens",
                         custom_attributes = { campaign_id = "c-1", email_address = absent } } },
    },
  },
  {
    name = "the configured environment is the batch's",
    config = { environment = "development" },
    event = { event_type = "users.messages.email.Send", id = "env-1", time = 1,
              user = { external_user_id = "c" } },
    expect = { batch = { environment = "development" } },
  },
  {
    name = "uninstall reaches its platform through the apps table",
    config = { apps = { ["android-app"] = "android" } },
    event = { event_type = "users.behaviors.Uninstall", id = "u-1", time = 1732800002,
              user = { external_user_id = "customer-2", device_id = "dev-2" },
              properties = { app_id = "android-app" } },
    expect = { feed = "android",
               batch = { device_info = { platform = "Android", android_uuid = "dev-2" } },
               event = { event_type = "uninstall", data = { event_name = absent } } },
  },
  {
    name = "kindle goes to the Android feed, a Google ad id to android_advertising_id",
    event = { event_type = "users.messages.pushnotification.Open", id = "k-1", time = 1,
              user = { external_user_id = "c", device_id = "fire-1" },
              properties = { platform = "kindle", ad_id = "g-1", ad_id_type = "google_ad_id" } },
    expect = { feed = "android",
               batch = { device_info = { platform = "Android", android_uuid = "fire-1",
                                         android_advertising_id = "g-1", ios_idfv = absent } } },
  },
  {
    name = "web goes to the Web feed",
    event = { event_type = "users.messages.inappmessage.Impression", id = "w-1", time = 1,
              user = { external_user_id = "c", device_id = "browser-1" },
              properties = { platform = "web" } },
    expect = { feed = "web",
               batch = { device_info = { platform = "web", ios_idfv = absent,
                                         android_uuid = absent } } },
  },
  {
    name = "a subscription change carries the email identity",
    event = { event_type = "users.behaviors.subscription.GlobalStateChange", id = "g-1",
              time = 1, user = { external_user_id = "c" },
              properties = { email_address = "jane@example.com", state_change_source = "SDK" } },
    expect = { batch = { user_identities = { email = "jane@example.com" } },
               event = { data = { event_name = "Global Subscription State Changes",
                                  custom_attributes = { email_address = absent } } } },
  },
  {
    name = "a Canvas event keeps email_address as an attribute, not an identity",
    event = { event_type = "users.canvas.Entry", id = "ce-1", time = 1,
              user = { external_user_id = "c" },
              properties = { email_address = "jane@example.com" } },
    expect = { batch = { user_identities = { email = absent } },
               event = { data = { custom_attributes = { email_address = "jane@example.com" } } } },
  },
  {
    name = "inbound SMS: $mobile from user_phone_number",
    event = { event_type = "users.messages.sms.InboundReceive", id = "s-2", time = 1,
              user = { external_user_id = "c" },
              properties = { user_phone_number = "+4915112345678", inbound_phone_number = "+1555" } },
    expect = { batch = { user_attributes = { ["$mobile"] = "+4915112345678" } },
               event = { data = { event_name = "SMS Inbound Received", custom_attributes = {
                 inbound_phone_number = "+1555", user_phone_number = absent } } } },
  },
  {
    name = "a platform feed without credentials falls back to unbound",
    config = { feeds = { ios = false } },
    event = { event_type = "users.messages.inappmessage.Click", id = "i-1", time = 1,
              user = { external_user_id = "c" }, properties = { platform = "tvos" } },
    expect = { feed = "unbound", batch = { device_info = { platform = absent } } },
  },
  {
    name = "a phone number of 4,096 characters is $mobile",
    event = { event_type = "users.messages.sms.Delivery", id = "s-00", time = 1,
              user = { external_user_id = "c" },
              properties = { to_phone_number = ("\u{e9}"):rep(4096) } },
    expect = { batch = { user_attributes = { ["$mobile"] = ("\u{e9}"):rep(4096) } } },
  },
  {
    name = "a phone number's characters are UTF-16 units: an emoji counts two",
    event = { event_type = "users.messages.sms.Delivery", id = "s-01", time = 1,
              user = { external_user_id = "c" },
              properties = { to_phone_number = ("\u{1F389}"):rep(2049) } },
    expect = { batch = { user_attributes = { ["$mobile"] = absent } } },
  },
  {
    name = "a phone number of more than 4,096 characters is left out",
    event = { event_type = "users.messages.sms.Delivery", id = "s-0", time = 1,
              user = { external_user_id = "c" },
              properties = { to_phone_number = ("1"):rep(4097) } },
    expect = { batch = { user_attributes = { ["$mobile"] = absent } },
               event = { data = { custom_attributes = { to_phone_number = absent } } } },
  },
  {
    name = "a phone number is $mobile on SMS and WhatsApp events only, from the user's side",
    event = { event_type = "users.canvas.Entry", id = "p-1", time = 1,
              user = { external_user_id = "c" }, properties = { to_phone_number = "+4915100000001" } },
    expect = { batch = { user_attributes = { ["$mobile"] = absent } },
               event = { data = { custom_attributes = { to_phone_number = "+4915100000001" } } } },
  },
  {
    name = "inbound WhatsApp: $mobile is the user's number, not the one it was sent to",
    event = { event_type = "users.messages.whatsapp.InboundReceive", id = "p-2", time = 1,
              user = { external_user_id = "c" },
              properties = { user_phone_number = "+4915100000002", to_phone_number = "+1555" } },
    expect = { batch = { user_attributes = { ["$mobile"] = "+4915100000002" } },
               event = { data = { custom_attributes = { to_phone_number = "+1555",
                                                        user_phone_number = absent } } } },
  },
  {
    name = "SMS: $mobile from to_phone_number",
    event = { event_type = "users.messages.sms.Delivery", id = "s-1", time = 1,
              user = { external_user_id = "c" },
              properties = { to_phone_number = "+4915112345678", from_phone_number = "+1555" } },
    expect = { batch = { user_attributes = { ["$mobile"] = "+4915112345678" } },
               event = { data = { custom_attributes = { from_phone_number = "+1555",
                                                        to_phone_number = absent } } } },
  },
  {
    name = "content_card_id is renamed, lists are joined, media_urls dropped",
    event = { event_type = "users.messages.contentcard.Click", id = "cc-1", time = 1,
              user = { external_user_id = "c" },
              properties = { content_card_id = "card-9", media_urls = { "https://x/1.png" },
                             suspected_bot_click_reason = { "ua", "ip" },
                             extra = { nested = true } } },
    expect = { event = { data = { custom_attributes = {
      card_id = "card-9", content_card_id = absent, media_urls = absent,
      suspected_bot_click_reason = "ua,ip", extra = '{"nested":true}' } } } },
  },
  {
    name = "a null device_id property keeps the user's device_id",
    event = { event_type = "users.messages.email.Send", id = "d-1", time = 1,
              user = { external_user_id = "c", device_id = "dev-1" },
              properties = { device_id = null } },
    expect = { event = { data = { custom_attributes = { device_id = "dev-1" } } } },
  },
  {
    name = "an unknown ad_id_type leaves ad_id, ad_id_type and ad_tracking_enabled as attributes",
    event = { event_type = "users.messages.pushnotification.Send", id = "ad-1", time = 1,
              user = { external_user_id = "c" },
              properties = { platform = "android", ad_id = "amzn-1", ad_id_type = "amazon_ad_id",
                             ad_tracking_enabled = "yes" } },
    expect = { batch = { device_info = { limit_ad_tracking = absent } },
               event = { data = { custom_attributes = {
                 ad_id = "amzn-1", ad_id_type = "amazon_ad_id", ad_tracking_enabled = "yes",
                 platform = "android" } } } },
  },
  {
    name = "a platform without a feed of its own stays an attribute on unbound",
    event = { event_type = "users.messages.inappmessage.Click", id = "roku-1", time = 1,
              user = { external_user_id = "c" },
              properties = { platform = "roku", ad_id = "r-1", ad_id_type = "roku_ad_id" } },
    expect = { feed = "unbound",
               batch = { device_info = { platform = absent, roku_advertising_id = "r-1" } },
               event = { data = { custom_attributes = { platform = "roku", ad_id = absent } } } },
  },
  {
    name = "a platform without a feed of its own is unbound also when the apps table names its app",
    config = { apps = { ["roku-app"] = "ios" } },
    event = { event_type = "users.messages.inappmessage.Click", id = "roku-2", time = 1,
              user = { external_user_id = "c", device_id = "roku-dev" },
              properties = { platform = "roku", app_id = "roku-app" } },
    expect = { feed = "unbound", batch = { device_info = { platform = absent, ios_idfv = absent } } },
  },
  {
    name = "an empty platform is none: the apps table routes it",
    config = { apps = { ["android-app"] = "android" } },
    event = { event_type = "users.messages.inappmessage.Click", id = "p-3", time = 1,
              user = { external_user_id = "c" }, properties = { platform = "", app_id = "android-app" } },
    expect = { feed = "android" },
  },
  {
    name = "a card_id of its own wins over content_card_id",
    event = { event_type = "users.messages.contentcard.Click", id = "cc-2", time = 1,
              user = { external_user_id = "c" },
              properties = { content_card_id = "renamed", card_id = "own" } },
    expect = { event = { data = { custom_attributes = { card_id = "own",
                                                        content_card_id = absent } } } },
  },
  {
    name = "identities and device identifiers are text; a table there is left out",
    event = { event_type = "users.messages.email.Open", id = "t-1", time = 1082083438.317,
              user = { external_user_id = 1234, device_id = { "x" } },
              properties = { email_address = { a = 1 }, device_model = 15 } },
    expect = {
      batch = { user_identities = { customer_id = "1234", email = absent },
                device_info = { device_model = "15" } },
      event = { data = { timestamp_unixtime_ms = 1082083438317,
                         custom_attributes = { device_id = absent } } },
    },
  },
  {
    name = "a device_model or ad_id that is not text stays an attribute, with its ad_id_type",
    event = { event_type = "users.messages.pushnotification.Send", id = "t-2", time = 1,
              user = { external_user_id = "c" },
              properties = { platform = "ios", device_model = { name = "iPhone15,2" },
                             ad_id = { "idfa-1" }, ad_id_type = "ios_idfa" } },
    expect = {
      batch = { device_info = { device_model = absent, ios_advertising_id = absent } },
      event = { data = { custom_attributes = { device_model = '{"name":"iPhone15,2"}',
                                               ad_id = "idfa-1", ad_id_type = "ios_idfa" } } },
    },
  },
  {
    name = "an ad_id_type without an ad_id stays an attribute",
    event = { event_type = "users.messages.pushnotification.Send", id = "t-3", time = 1,
              user = { external_user_id = "c" },
              properties = { platform = "ios", ad_id = null, ad_id_type = "ios_idfa" } },
    expect = { batch = { device_info = { ios_advertising_id = absent } },
               event = { data = { custom_attributes = { ad_id = absent,
                                                        ad_id_type = "ios_idfa" } } } },
  },
  {
    name = "properties that are not an object are read as empty",
    event = { event_type = "users.messages.email.Send", id = "n-2", time = 1,
              user = { external_user_id = "c" }, properties = { "a", "b" } },
    expect = { event = { data = { custom_attributes = { [1] = absent } } } },
  },
  {
    name = "no external_user_id: skipped",
    event = { event_type = "users.messages.email.Send", id = "x-1", time = 1,
              user = { user_id = "5f8a" }, properties = {} },
    expect_drop = "no_external_id",
  },
  {
    name = "an external_user_id of blanks only is none",
    event = { event_type = "users.messages.email.Send", id = "x-3", time = 1,
              user = { external_user_id = " \t " }, properties = {} },
    expect_drop = "no_external_id",
  },
  {
    name = "an external_user_id that begins with blanks is kept as it is",
    event = { event_type = "users.messages.email.Send", id = "x-4", time = 1,
              user = { external_user_id = " \tc-1" }, properties = {} },
    expect = { batch = { user_identities = { customer_id = " \tc-1" } } },
  },
  {
    name = "an event type outside the mapping is filtered",
    event = { event_type = "users.behaviors.CustomEvent", id = "x-2", time = 1,
              user = { external_user_id = "c" } },
    expect_drop = "unsupported_type",
  },
  {
    name = "the events setting narrows the selection, with Braze's alias spelling",
    config = { events = { "users_canvas_abort" } },
    event = { event_type = "users.canvas.Entry", id = "x-3", time = 1,
              user = { external_user_id = "c" } },
    expect_drop = "not_selected",
  },
  {
    name = "Braze's other alias selects campaign aborts",
    config = { events = { "users_campaigns_abort" } },
    event = { event_type = "users.campaigns.Abort", id = "x-5", time = 1,
              user = { external_user_id = "c" } },
    expect = { event = { data = { event_name = "Campaign Aborts" } } },
  },
  {
    name = "an alias selects the event",
    config = { events = { "users_canvas_abort" } },
    event = { event_type = "users.canvas.Abort", id = "x-4", time = 1,
              user = { external_user_id = "c" } },
    expect = { event = { data = { event_name = "Canvas Aborts" } } },
  },
}

return { process = process, tests = tests }
