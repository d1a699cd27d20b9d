local util = require("util.strings")
local again = require("util.strings")
function on_message(msg, ctx)
  ctx:route("out", util.shout(msg:get("PID-5.1")) .. tostring(util == again))
end
