<?xml version="1.0" encoding="UTF-8"?>
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform" xmlns:o="urn:his:order">
  <xsl:param name="hub"/>
  <xsl:output method="xml" indent="no"/>
  <xsl:template match="/o:Order">
    <Request hub="{$hub}">
      <Patient id="{o:Patient/o:Id}"><xsl:value-of select="o:Patient/o:Name"/></Patient>
      <xsl:for-each select="o:Item">
        <Exam code="{@code}"><xsl:value-of select="."/></Exam>
      </xsl:for-each>
    </Request>
  </xsl:template>
</xsl:stylesheet>
