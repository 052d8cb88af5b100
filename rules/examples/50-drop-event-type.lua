-- Drop an event type: Email Deliveries are not wanted in mParticle.
-- Copy into rules_dir; it runs after 10-mparticle.lua.
return {
  process = function(event, out)
    if event.event_type == "users.messages.email.Delivery" then
      return false, "email deliveries are not forwarded"
    end
  end,
  tests = {
    { name = "email deliveries are dropped",
      event = { event_type = "users.messages.email.Delivery", id = "d-1", time = 1732800000,
                user = { external_user_id = "c-1" }, properties = { email_address = "a@b.c" } },
      expect_drop = "email deliveries are not forwarded" },
    { name = "other email events pass",
      event = { event_type = "users.messages.email.Open", id = "o-1", time = 1732800000,
                user = { external_user_id = "c-1" } },
      expect = { event = { data = { event_name = "Email Opens" } } } },
  },
}
