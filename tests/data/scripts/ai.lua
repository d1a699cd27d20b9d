-- ai.findings / ai.verdict: what the host is asked, what comes back, and
-- the errors a script gets (ctx.message_id picks the case).
function on_message(msg, ctx)
  local id = ctx.message_id
  if id == "findings" then
    local fs = ai.findings{accession = "ACC1", study_uid = ""}
    ctx:log("info", #fs, fs[1].job_id, fs[1].code.code, tostring(fs[1].critical))
    ctx:log("info", #ai.findings("ACC404"), #ai.findings{study_uid = "2.25.9", accession = json.null})
  elseif id == "verdict" then
    ctx:log("info", ai.verdict("AJ-1", "F1", "confirmed",
                               {by = "RAD1", note = "impression", report = msg:get("MSH-10")}))
    ctx:log("info", ai.verdict("AJ-1", "F1", "overridden"))
  elseif id == "unknown" then
    ai.verdict("AJ-1", "F9", "confirmed", {by = "RAD1"})
  elseif id == "bad_verdict" then
    ai.verdict("AJ-1", "F1", "maybe")
  elseif id == "bad_option" then
    ai.verdict("AJ-1", "F1", "confirmed", {radiologist = "RAD1"})
  elseif id == "no_query" then
    ai.findings{}
  elseif id == "no_ids" then
    ai.verdict(nil, "F1", "confirmed")
  end
end
