-- Rename an event: mParticle dashboards already use "Email Opened".
local RENAMES = {
  ["Email Opens"] = "Email Opened",
  ["Email Clicks"] = "Email Link Clicked",
}

return {
  process = function(event, out)
    if not out or out.event.event_type ~= "custom_event" then return end
    local data = out.event.data
    data.event_name = RENAMES[data.event_name] or data.event_name
  end,
  tests = {
    { name = "Email Opens becomes Email Opened",
      event = { event_type = "users.messages.email.Open", id = "o-1", time = 1732800000,
                user = { external_user_id = "c-1" } },
      expect = { event = { data = { event_name = "Email Opened" } } } },
    { name = "names without a rename stay",
      event = { event_type = "users.messages.sms.Send", id = "s-1", time = 1732800000,
                user = { external_user_id = "c-1" } },
      expect = { event = { data = { event_name = "SMS Sends" } } } },
  },
}
