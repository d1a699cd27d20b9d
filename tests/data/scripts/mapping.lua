-- A typical mapping: 10-20 reads and writes, one route.
local facility_map = { RADRELAY_TEST_HOSP = "HOSP1" }

function on_message(msg, ctx)
  if msg:get("MSH-9.1") ~= "ADT" then
    return ctx:filter("not ADT")
  end
  local mrn = msg:get("PID-3[1].1")
  local family = msg["PID-5.1"]
  local given = msg["PID-5.2"]
  local dob = msg:get("PID-7")
  local sex = msg:get("PID-8")
  local fac = msg:get("MSH-4")
  local visit = msg:get("PV1-19.1")
  local loc = msg:get("PV1-3.1")
  local att = msg:get("PV1-7.2")
  msg:set("MSH-3", "RADRELAY")
  msg:set("MSH-4", facility_map[fac] or fac)
  msg:set("MSH-5", "PACS")
  msg:set("MSH-6", "RAD")
  msg["PID-5.1"] = family:upper()
  msg["PID-5.2"] = given:upper()
  msg:set("PID-3[1].1", "H" .. mrn)
  msg:set("PID-8", sex == "M" and "M" or (sex == "F" and "F" or "U"))
  msg:set("PV1-3.1", loc .. "-" .. visit:sub(1, 4))
  msg:set("PV1-7.2", att)
  msg:set("PID-7", dob)
  msg:delete("PV2")
  ctx:route("pacs", msg)
end
