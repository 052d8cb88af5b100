-- Remove attributes: Braze's dispatch_id and send_id are noise in mParticle.
local NOT_WANTED = { dispatch_id = true, send_id = true }

return {
  process = function(event, out)
    if not out then return end
    local attrs = out.event.data.custom_attributes
    for name in pairs(NOT_WANTED) do attrs[name] = nil end
  end,
  tests = {
    { name = "dispatch_id and send_id are removed, the rest stays",
      event = { event_type = "users.messages.pushnotification.Send", id = "p-1", time = 1732800000,
                user = { external_user_id = "c-1" },
                properties = { dispatch_id = "x", send_id = "y", campaign_name = "Winter" } },
      expect = { event = { data = { custom_attributes = {
        dispatch_id = tributary.absent, send_id = tributary.absent, campaign_name = "Winter" } } } } },
  },
}
