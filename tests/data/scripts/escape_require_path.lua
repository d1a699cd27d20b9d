-- sandbox escape: require_path
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local m = require("../escape_io")
end
